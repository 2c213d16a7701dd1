"""Long commands say on stderr what they do and how far along they are (issue #23, part 4), and
keep stdout for their results: `pixtok export` (a checkpoint, and a model store). `pixtok eval`
and `pixtok bench sample` are checked in test_generation_eval.py, `pixtok serve`'s start-up in
test_gradio.py (test_pixtok_serve_starts_both_and_stop_stops_both)."""
from __future__ import annotations

from clirun import ENV, pixtok
from conftest import make_classifier


def test_export_names_each_stage_on_stderr(tmp_path):
    ckpt = make_classifier(tmp_path / "tiny-cls")
    res = pixtok("export", ckpt, "--out", tmp_path / "store")
    assert (tmp_path / "store" / "tiny-cls.mar").is_file()
    for stage in ("staging the code", "staging the weights", "ONNX export and check",
                  "writing the archive", "done"):
        assert f"export tiny-cls: {stage}" in res.stderr, res.stderr
    assert "4/4 stages" in res.stderr            # a classifier's archive carries its ONNX file
    assert "stages" not in res.stdout and "archive: " in res.stdout     # stdout as before


def test_export_of_a_model_store_counts_the_archives_it_builds(tmp_path):
    store = tmp_path / "store"
    for name in ("a-cls", "b-cls"):
        make_classifier(store / name)
    res = pixtok("export", store, "--out", store)
    assert "building archives: a-cls.mar" in res.stderr
    assert "building archives: b-cls.mar" in res.stderr and "2/2" in res.stderr
    again = pixtok("export", store, "--out", store)        # nothing stale: no bar at all
    assert "building archives" not in again.stderr
    quiet = pixtok("export", make_classifier(tmp_path / "c-cls"), "--out", store,
                   env={**ENV, "TQDM_DISABLE": "1"})
    assert "export c-cls" not in quiet.stderr               # tqdm's own switch turns it off
