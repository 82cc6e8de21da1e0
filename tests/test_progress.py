from fxopt import progress


def test_bars_off_when_quiet_and_off_when_not_a_tty(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    data = range(3)
    progress.quiet(True)
    try:
        assert progress.bar(data, "x") is data  # quiet: no bar object at all
    finally:
        progress.quiet(False)
    wrapped = progress.bar(data, "x")
    assert wrapped is not data and wrapped.disable  # a tqdm bar, disabled: pytest's stderr is not a TTY
    assert list(wrapped) == [0, 1, 2]
