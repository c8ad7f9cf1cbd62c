"""Torch's thread count per run (issue 21): auto (free cores) or a set number, for the app and the CLI."""

import pytest
import torch

from declab.run import threads


def test_parse_takes_auto_or_a_positive_count_and_names_the_legal_values():
    assert threads.parse(None) is None and threads.parse("auto") is None and threads.parse(" AUTO ") is None
    assert threads.parse("0") is None and threads.parse("") is None
    assert threads.parse("3") == 3 and threads.parse(2) == 2
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ValueError, match="'auto' or a whole number of threads >= 1"):
            threads.parse(bad)


def test_auto_leaves_the_cores_other_work_is_using(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 3)
    assert threads.choose() == 5 and threads.choose("auto") == 5
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 12)            # a crowded machine: still one thread
    assert threads.choose() == 1
    assert threads.choose(4) == 4                                          # a set number is taken as it is
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.choose() == 2


def test_busy_elsewhere_takes_the_least_of_its_readings(monkeypatch, tmp_path):
    readings = iter(["0.5 0.4 0.3 4/100 7\n", "0.5 0.4 0.3 2/100 7\n", "0.5 0.4 0.3 5/100 7\n"])
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/loadavg":
            f = tmp_path / "loadavg"
            f.write_text(next(readings))
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", fake_open)
    assert threads.busy_elsewhere(samples=3, gap_s=0) == 1                 # min(4, 2, 5) minus the caller


def test_a_service_run_takes_the_chosen_threads_and_records_them(fake_registry, monkeypatch):
    from declab.run import Run, RunRequest
    from declab.run.service import Job, RunService
    from tests.fake import FakeLM
    before = torch.get_num_threads()
    try:
        lm = FakeLM()
        service = RunService([Job("a", Run(lm, RunRequest(model=lm.key, strategy="greedy", prompt=" the cat",
                                                          max_new_tokens=3)))], store_path="", threads=1).start()
        service.wait()
        assert service.used_threads == {0: 1}
        assert service.jobs[0].run.result.meta["metrics"]["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_cli_refuses_a_bad_thread_setting_with_one_line(fake_registry, monkeypatch, capsys):
    from declab.cli import main
    monkeypatch.setenv(threads.ENV, "lots")
    assert main(["list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["declab: error: DECLAB_THREADS must be 'auto' or a whole number of threads >= 1, got 'lots'"]


def test_in_passing_thread_runs_elsewhere_and_hands_back_the_result_or_the_error():
    import threading
    here = threading.current_thread()
    assert threads.in_passing_thread(lambda: threading.current_thread()) is not here

    def boom():
        raise ValueError("the load failed")
    with pytest.raises(ValueError, match="the load failed"):
        threads.in_passing_thread(boom)


def test_the_app_loads_models_in_a_passing_thread(monkeypatch):
    """The page's script thread lives on while the run decodes, so it must not keep torch's OpenMP pool (see
    declab/run/threads.py): the load runs in a thread that has ended when the model is handed back."""
    import threading
    from app import common
    seen = []

    def load(spec):
        seen.append(threading.current_thread())
        return ("lm", {})
    monkeypatch.setattr(common.loading, "load_lm", load)
    common._cached_lm.clear()
    try:
        assert common._cached_lm(common.load_registry(common.registry_path()).default, common.registry_path()) == "lm"
    finally:
        common._cached_lm.clear()
    assert seen and seen[0] is not threading.current_thread() and not seen[0].is_alive()
