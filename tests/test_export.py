"""Tests for ftcourse.export, the pipeline: options checked before work, the folder written as a set,
an adapter exported end to end, and no network on the way."""

from __future__ import annotations

import json
import os
import sys

import pytest
from export_fixtures import *  # noqa: F403
from export_fixtures import F16_MAX_LOGIT_DIFF, MERGE_MAX_LOGIT_DIFF, copy_model_dir, load_model, save_adapter

from ftcourse import export, llamacpp, merge


def test_pipeline_writes_the_folder_as_a_set_with_a_manifest(export_model_dir, tmp_path, no_network):
    out = tmp_path / "export"
    result = export.export_pipeline(export_model_dir, out, ("f16", "Q4_K_M"), progress=False)
    manifest = json.loads((out / export.MANIFEST).read_text())

    assert set(manifest["files"]) == {"model-f16.gguf", "model-Q4_K_M.gguf", "Modelfile"}
    assert {p.name for p in out.iterdir()} == {*manifest["files"], export.MANIFEST}
    assert result.gguf_files == {"f16": out / "model-f16.gguf", "Q4_K_M": out / "model-Q4_K_M.gguf"}
    assert "FROM ./model-f16.gguf" in result.modelfile.read_text()  # no q8_0 asked for: f16 is served
    assert no_network == []  # loading, writing and quantizing open no socket

    # A second export into the same folder replaces it as a whole: no q4 file of the first run is left.
    export.export_pipeline(export_model_dir, out, ("q8_0",), progress=False)
    assert {p.name for p in out.iterdir()} == {
        "model-f16.gguf",
        "model-q8_0.gguf",
        "Modelfile",
        export.MANIFEST,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left beside it


def test_failed_export_leaves_the_earlier_export_as_it_was(export_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "export"
    export.export_pipeline(export_model_dir, out, ("f16",), progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llamacpp, "quantize_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_pipeline(export_model_dir, out, ("f16", "Q4_K_M"), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quants": ("f16", "Q4_K_X")}, "Unknown GGUF type 'Q4_K_X'"),
        ({"quants": ("IQ2_XXS",)}, "importance matrix"),
        ({"ollama_name": "bad name!"}, "not an Ollama model name"),
        ({"system_prompt": 'a """ b\n'}, 'contains """'),
    ],
)
def test_bad_options_are_refused_before_any_work(export_model_dir, tmp_path, kwargs, match, monkeypatch):
    monkeypatch.setattr(merge, "save_merged", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(export.ExportError, match=match):
        export.export_pipeline(export_model_dir, tmp_path / "out", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_output_folders_that_cannot_take_an_export_are_refused(export_model_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")

    with pytest.raises(export.ExportError, match="is a file"):
        export.export_pipeline(export_model_dir, tmp_path / "a-file", progress=False)
    with pytest.raises(export.ExportError, match="not an earlier ftcourse export"):
        export.export_pipeline(export_model_dir, tmp_path / "notes", progress=False)
    with pytest.raises(export.ExportError, match="Cannot write /proc/ftcourse-test.*not writable"):
        export.export_pipeline(export_model_dir, "/proc/ftcourse-test", progress=False)
    model = copy_model_dir(export_model_dir, tmp_path / "out" / "model")
    with pytest.raises(export.ExportError, match="lies inside the output folder"):
        export.export_pipeline(model, tmp_path / "out", progress=False)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_adapter_exports_end_to_end_without_network(export_model_dir, tmp_path, no_network):
    adapter = save_adapter(export_model_dir, tmp_path / "adapter")
    result = export.export_pipeline(adapter, tmp_path / "out", ("f16",), base_model_dir=export_model_dir,
                                    progress=False)  # fmt: skip

    assert no_network == []
    assert result.hf_dir == tmp_path / "out" / "hf" and result.notes == []
    from peft import PeftModel

    base, tokenizer = load_model(export_model_dir)
    adapted = PeftModel.from_pretrained(base, adapter)
    merged = load_model(result.hf_dir)[0]
    ids = tokenizer(["Once upon a time"], return_tensors="pt")["input_ids"]
    assert merge.max_logit_difference(merged, adapted, ids) < MERGE_MAX_LOGIT_DIFF  # the adapter is in
    with adapted.disable_adapter():
        assert merge.max_logit_difference(merged, adapted, ids) > 1e-2
    report = llamacpp.compare_with_llama_cpp(merged, tokenizer, result.gguf_files["f16"], ["Once upon a"], 8)
    assert report.max_abs_logit_diff < F16_MAX_LOGIT_DIFF


def test_without_llama_cpp_k_quants_are_skipped_with_the_install_command(
    export_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError

    result = export.export_pipeline(export_model_dir, tmp_path / "out", progress=False)

    assert set(result.gguf_files) == {"f16", "q8_0"}
    assert "pip install llama-cpp-python" in result.skipped["Q4_K_M"]
    assert "FROM ./model-q8_0.gguf" in result.modelfile.read_text()
    with pytest.raises(export.ExportError, match="CMAKE_ARGS=.* pip install llama-cpp-python=="):
        llamacpp.quantize_gguf(result.gguf_files["f16"], tmp_path / "q4.gguf")


def test_damaged_base_is_refused_before_any_work(export_model_dir, tmp_path):
    adapter = save_adapter(export_model_dir, tmp_path / "adapter")
    base = copy_model_dir(export_model_dir, tmp_path / "base")
    (base / "config.json").write_text("{not json")

    with pytest.raises(
        export.ExportError, match=r"--base folder cannot be used: .*config\.json is not valid JSON"
    ):
        export.export_pipeline(adapter, tmp_path / "out", base_model_dir=base, progress=False)
    assert not (tmp_path / "out").exists()


# --- Export that never lies: each case below once reported success wrongly or ended in a traceback ------


def test_symlinked_output_folder_stays_a_link_to_the_export(export_model_dir, tmp_path):
    target = tmp_path / "disk" / "export"
    target.mkdir(parents=True)
    link = tmp_path / "export"
    link.symlink_to(target)

    for quants in (("f16",), ("q8_0",)):  # a first export, then one that replaces it
        result = export.export_pipeline(export_model_dir, link, quants, progress=False)
    assert link.is_symlink() and link.resolve() == target
    assert (target / export.MANIFEST).is_file() and (target / "model-q8_0.gguf").is_file()
    assert result.gguf_files["q8_0"] == target / "model-q8_0.gguf"
    assert [p.name for p in target.parent.iterdir()] == ["export"]  # no .old, .partial or lock left


def test_dangling_symlink_and_current_folder_are_refused_in_words(export_model_dir, tmp_path, monkeypatch):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(export.ExportError, match="symbolic link to .*nowhere, which does not exist"):
        export.export_pipeline(export_model_dir, tmp_path / "gone", progress=False)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", "./", "..", str(here)):
        with pytest.raises(export.ExportError, match="current folder or one above it"):
            export.export_pipeline(export_model_dir, out, progress=False)


def test_full_disk_is_reported_and_the_earlier_export_kept(export_model_dir, tmp_path, monkeypatch, capsys):
    import errno

    from ftcourse import cli

    out = tmp_path / "export"
    export.export_pipeline(export_model_dir, out, ("f16",), progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def full_disk(model_dir, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export, "write_gguf", full_disk)
    status = cli.main(["export", str(export_model_dir), str(out), "--quant", "f16", "--no-progress"])

    assert status == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("where", ["model", "base", "adapter"])
def test_json_list_instead_of_a_config_is_refused_in_words(export_model_dir, tmp_path, where, capsys):
    from ftcourse import cli

    model = copy_model_dir(export_model_dir, tmp_path / "model")
    adapter = save_adapter(export_model_dir, tmp_path / "adapter")
    damaged = {"model": model / "config.json", "base": model / "config.json",
               "adapter": adapter / "adapter_config.json"}[where]  # fmt: skip
    damaged.write_text("[1, 2]")
    argv = {"model": [str(model)], "base": [str(adapter), "--base", str(model)],
            "adapter": [str(adapter), "--base", str(export_model_dir)]}[where]  # fmt: skip

    assert cli.main(["export", argv[0], str(tmp_path / "out"), *argv[1:], "--no-progress"]) == 1
    assert "holds a list, not a JSON object" in capsys.readouterr().err


def test_base_for_a_plain_model_is_refused_not_ignored(export_model_dir, tmp_path):
    with pytest.raises(export.ExportError, match="--base is for an adapter folder.*plain model folder"):
        export.export_pipeline(export_model_dir, tmp_path / "out", base_model_dir=export_model_dir,
                               progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_second_export_into_the_same_folder_at_once_is_refused(export_model_dir, tmp_path):
    out = tmp_path / "export"
    with export.export_lock(out):  # what a running export holds while it writes
        with pytest.raises(export.ExportError, match=rf"Another export \(process {os.getpid()}\) is writing"):
            export.export_pipeline(export_model_dir, out, ("f16",), progress=False)
    export.export_pipeline(export_model_dir, out, ("f16",), progress=False)  # free again afterwards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_stale_staging_is_removed_and_a_lost_export_recovered(export_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "export"
    export.export_pipeline(export_model_dir, out, ("f16",), progress=False)
    earlier = sorted(p.name for p in out.iterdir())
    # A crash between the two renames: the earlier export survives only as a hidden .old; and a kill -9
    # during another run left its staging folder.
    out.rename(tmp_path / ".export.4242.old")
    (tmp_path / ".export.4343.partial").mkdir()
    (tmp_path / ".export.4343.partial" / "model-f16.gguf").write_bytes(b"\0" * 2**20)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):  # the next run fails too, after recovering
        export.export_pipeline(export_model_dir, out, ("f16",), progress=False)
    assert sorted(p.name for p in out.iterdir()) == earlier  # the earlier export is back in place
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no hidden folder left

    monkeypatch.undo()
    (tmp_path / ".export.4444.partial").mkdir()
    result = export.export_pipeline(export_model_dir, out, ("f16",), progress=False)
    assert result.notes == ["removed .export.4444.partial (0.0 MiB), left by an interrupted export"]
    assert "removed .export.4444.partial" in result.table()
