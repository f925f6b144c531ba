"""Reliability holes closed in storage, the formats, base loading and the command line.

- a base model a checkpoint names never runs its own code nor unpickles weights;
- regular expressions in ``adapter_config.json`` (which PEFT would run against every module name) are refused;
- archives: replacing one never leaves a truncated file (a real full disk); extraction is capped and refuses
  non-empty outputs and duplicate names before writing;
- ``run.json`` is read bounded and strictly, and one bad run hides no other;
- every management command fails with one line naming the thing and the fix, storage errors included.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.checkpoints import fake_checkpoint
from helpers.cli import cli
from helpers.storage import small_tmpfs
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import CheckpointFormatError, CheckpointStore, LoRACheckpointIO, LoRAModule, extract_archive
from lightning_lora_ckpt.format.adapter_files import check_module_names, encode_adapter
from lightning_lora_ckpt.format.manifest import ADAPTER_CONFIG, MANIFEST
from lightning_lora_ckpt.format.records import MAX_RUN_BYTES, RUN_FILE
from lightning_lora_ckpt.modeling.base import load_base_model, load_config, load_tokenizer
from lightning_lora_ckpt.storage.loading import open_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real training checkpoint of the tiny model (LoRAModule defaults), never modified."""
    root = tmp_path_factory.mktemp("pristine")
    io_ = LoRACheckpointIO(root=str(root), run_id="run", async_save=False)
    module = LoRAModule(**MODULE_KWARGS)
    make_trainer(io_, max_steps=1).fit(module, batch_loader(1))
    return Path(module.save_state("t"))


@pytest.fixture
def ckpt(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine checkpoint under ``tmp_path/root/run/weights/t``, free to tamper with."""
    target = tmp_path / "root" / "run" / "weights" / "t"
    shutil.copytree(pristine, target)
    return target


def set_base(ckpt: Path, name_or_path: str) -> None:
    """Forge the manifest's base model (the manifest is not in its own file list: nothing else to fix)."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["base_model"]["name_or_path"] = name_or_path
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def replace_file(ckpt: Path, name: str, data: bytes) -> None:
    """Swap a file's content and keep the manifest's size and sha256 of it valid."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


# -- 1. a base named by a checkpoint runs no code ---------------------------------------------------------
def evil_module(marker: Path) -> str:
    """Python source that creates ``marker`` when imported (what auto_map would make transformers import)."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nraise SystemExit('evil code ran')\n"


class _Pickled:
    """Unpickling this creates ``marker`` (a pickle-only base's weights)."""

    marker: Path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def make_remote_code_base(directory: Path, marker: Path, model_type: str) -> Path:
    """A local base whose config, model and tokenizer are to be built by its own Python code (auto_map)."""
    directory.mkdir(parents=True)
    (directory / "evil.py").write_text(evil_module(marker))
    known = load_config("tiny-qwen3").to_dict() if model_type == "qwen3" else {}  # tiny: a default qwen3 is 8B
    config = {
        **known,
        "model_type": model_type,
        "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"},
    }
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}})
    )
    # safetensors weights present: only the code question stands in the way
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(directory / "model.safetensors"))
    return directory


def make_pickle_base(directory: Path, marker: Path) -> Path:
    """A local base of a known architecture whose only weights are a pickle that runs a command when loaded."""
    load_config("tiny-qwen3").save_pretrained(directory)
    evil = _Pickled()
    evil.marker = marker
    torch.save({"model.embed_tokens.weight": evil}, directory / "pytorch_model.bin")
    return directory


LOAD_SCRIPT = """
import sys, traceback
from lightning_lora_ckpt import CheckpointFormatError, LoRAModule, SamplingClient, merge_adapter
uri, out = sys.argv[1], sys.argv[2]
for name, load in [
    ("SamplingClient.from_checkpoint", lambda: SamplingClient.from_checkpoint(uri)),
    ("LoRAModule.from_checkpoint", lambda: LoRAModule.from_checkpoint(uri)),
    ("merge_adapter", lambda: merge_adapter(uri, out)),
]:
    try:
        load()
    except CheckpointFormatError as err:
        print(name, "REFUSED", str(err).replace(chr(10), " "))
    except BaseException as err:
        print(name, "OTHER", type(err).__name__, str(err).replace(chr(10), " ")[:300])
    else:
        print(name, "LOADED")
"""


def load_in_subprocess_without_stdin(uri: str, out: Path) -> list[str]:
    """Load ``uri`` through each entry point in a fresh process whose stdin is closed (no prompt can be answered)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        ["bash", "-c", 'exec "$0" "$@" <&-', sys.executable, "-c", LOAD_SCRIPT, uri, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.split(" ", 1)[0] in LOAD_SCRIPT]


@pytest.mark.parametrize("model_type", ["evil_lm", "qwen3"], ids=["unknown-type", "known-type"])
def test_a_base_named_by_a_checkpoint_never_runs_its_code(ckpt: Path, tmp_path: Path, model_type: str) -> None:
    marker = tmp_path / "ran"
    base = make_remote_code_base(tmp_path / "evil-base", marker, model_type)
    set_base(ckpt, str(base))
    lines = load_in_subprocess_without_stdin(str(ckpt), tmp_path / "merged")
    assert len(lines) == 3, lines
    # A known type loads transformers' own classes (auto_map ignored), and is then refused as another base than
    # the checkpoint's; an unknown one needs its code: refused.
    assert all("REFUSED" in line or "cannot be loaded onto" in line for line in lines), lines
    if model_type == "evil_lm":
        assert all("REFUSED" in line and "needs Python code of its own" in line for line in lines), lines
    assert not marker.exists()
    assert not (tmp_path / "merged").exists()


def test_loaders_pass_trust_remote_code_false(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    base = make_remote_code_base(tmp_path / "evil-base", marker, "evil_lm")
    for load in (
        lambda: load_config(str(base)),
        lambda: load_base_model(str(base)),
        lambda: load_tokenizer(str(base)),
    ):
        with pytest.raises((CheckpointFormatError, ValueError, OSError)):
            load()
    with pytest.raises(CheckpointFormatError, match=r"needs Python code of its own .* trust_remote_code=True"):
        load_base_model(str(base))
    assert not marker.exists()


def test_a_pickle_only_base_named_by_a_checkpoint_is_refused_not_unpickled(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    base = make_pickle_base(tmp_path / "bin-base", marker)
    set_base(ckpt, str(base))
    lines = load_in_subprocess_without_stdin(str(ckpt), tmp_path / "merged")
    assert len(lines) == 3 and all("REFUSED" in line and "has no safetensors weights" in line for line in lines), lines
    assert not marker.exists()
    with pytest.raises(CheckpointFormatError, match=r"bin-base.* has no safetensors weights .*allow_pickle=True"):
        load_base_model(str(base))
    assert not marker.exists()


def test_a_config_pointing_at_pickled_weights_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    load_base_model("tiny-qwen3").save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(CheckpointFormatError, match=r"transformers_weights='adapter_model\.bin', not a safetensors"):
        load_base_model(str(base))


def test_a_trusted_pickle_base_loads_when_the_caller_opts_in(tmp_path: Path) -> None:
    base = tmp_path / "bin-base"
    model = load_base_model("tiny-qwen3")
    model.config.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="has no safetensors weights"):
        load_base_model(str(base))
    loaded = load_base_model(str(base), allow_pickle=True)
    assert torch.equal(loaded.state_dict()["model.norm.weight"], model.state_dict()["model.norm.weight"])


# -- 2. regular expressions in adapter_config.json ---------------------------------------------------------
HOSTILE_PATTERNS = [
    ("target_modules", "(.*.*)*z"),
    ("target_modules", ["q_proj", "(a+)+$"]),
    ("exclude_modules", "(.*.*)*z"),
    ("modules_to_save", ["(.*)*x"]),
    ("layers_pattern", ["(x+x+)+y"]),
    ("rank_pattern", {"(.*.*)*z": 4}),
    ("alpha_pattern", {"(.*.*)*z": 8}),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("key", "value"), HOSTILE_PATTERNS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(HOSTILE_PATTERNS)]
)
def test_a_regex_in_adapter_config_is_refused_before_any_loader_runs_it(ckpt: Path, key: str, value: Any) -> None:
    config = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    config[key] = value
    replace_file(ckpt, ADAPTER_CONFIG, json.dumps(config).encode())
    started = time.monotonic()
    with pytest.raises(CheckpointFormatError, match=rf"{ADAPTER_CONFIG} has {key} entry .* not a plain module name"):
        open_checkpoint(str(ckpt))
    assert time.monotonic() - started < 10
    assert not CheckpointStore(str(ckpt.parents[2])).verify(str(ckpt)).ok


@pytest.mark.timeout(120)
def test_a_regex_target_is_refused_by_the_sampling_client(ckpt: Path) -> None:
    from lightning_lora_ckpt import SamplingClient

    config = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    replace_file(ckpt, ADAPTER_CONFIG, json.dumps({**config, "target_modules": "(.*.*)*z"}).encode())
    with pytest.raises(CheckpointFormatError, match=r"target_modules entry '\(\.\*\.\*\)\*z'"):
        SamplingClient.from_checkpoint(str(ckpt))


def test_configs_peft_writes_still_pass(pristine: Path) -> None:
    import peft

    saved = json.loads((pristine / ADAPTER_CONFIG).read_text())
    assert isinstance(saved["target_modules"], list) and saved["target_modules"]  # "all-linear", expanded by PEFT
    check_module_names(saved, "pristine")
    assert open_checkpoint(str(pristine)).adapter_config["target_modules"] == saved["target_modules"]
    written = peft.LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj", "model.layers.0.mlp.down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
        layers_pattern="layers",
        layers_to_transform=[0, 1],
    ).to_dict()
    check_module_names(json.loads(json.dumps(written, default=sorted)), "peft")
    check_module_names({"target_modules": "all-linear"}, "peft")
    check_module_names({"target_modules": "q_proj"}, "peft")


def test_a_regex_target_is_refused_at_save_not_written(tmp_path: Path) -> None:
    checkpoint = fake_checkpoint(1)
    checkpoint["lora_ckpt"]["adapter_config"]["target_modules"] = r".*\.(q|v)_proj"
    io_ = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False)
    with pytest.raises(CheckpointFormatError, match=r"The LoRA adapter to save: .* target_modules entry"):
        io_.save_checkpoint(checkpoint, "t1")
    assert CheckpointStore(str(tmp_path)).list_checkpoints("run") == []
    with pytest.raises(CheckpointFormatError):
        encode_adapter({}, {"rank_pattern": {"(.*)*": 2}})


# -- 3. archives ------------------------------------------------------------------------------------------
@pytest.fixture
def small_and_big(tmp_path: Path) -> tuple[CheckpointStore, str, str]:
    """A store with a small checkpoint and one with a 400 KiB tensor in its training state."""
    root = tmp_path / "ckpts"
    io_ = LoRACheckpointIO(root=str(root), run_id="run", async_save=False)
    io_.save_checkpoint(fake_checkpoint(1), "small")
    big = fake_checkpoint(2)
    big["extra"] = torch.randn(100_000)  # 400 KB of incompressible floats
    io_.save_checkpoint(big, "big")
    return CheckpointStore(str(root)), "lora://run/weights/small", "lora://run/weights/big"


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A real 600 KiB tmpfs (needs root and mount permission; skipped otherwise), unmounted afterwards."""
    with small_tmpfs(tmp_path / "disk", "600k") as disk:
        yield disk


def fill(disk: Path) -> None:
    """Write a filler file until the disk is full."""
    with open(disk / "filler", "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass


def test_archive_over_an_existing_one_on_a_full_disk_keeps_it(
    small_and_big: tuple[CheckpointStore, str, str], small_disk: Path
) -> None:
    store, small, big = small_and_big
    tar = small_disk / "ckpt.tar"
    store.archive(small, str(tar))
    before = tar.read_bytes()
    fill(small_disk)
    with pytest.raises(OSError) as info:
        store.archive(big, str(tar))  # larger than the old archive: truncating it first would not make room
    assert info.value.errno is not None  # ENOSPC (or EDQUOT), not a partial success
    assert tar.read_bytes() == before  # the old archive, intact
    assert sorted(p.name for p in small_disk.iterdir()) == ["ckpt.tar", "filler"]  # no temporary sibling left
    (small_disk / "filler").unlink()
    store.archive(big, str(tar))  # room again: the archive is replaced
    out = small_disk.parent / "x"
    extract_archive(str(tar), out)
    assert CheckpointStore(str(store.root)).verify(str(out)).ok


def test_archive_to_a_remote_filesystem_uploads_a_complete_file(
    small_and_big: tuple[CheckpointStore, str, str], tmp_path: Path
) -> None:
    store, small, _ = small_and_big
    uri = f"memory://archives-{uuid.uuid4().hex}/ckpt.tar.gz"
    store.archive(small, uri)
    out = extract_archive(uri, tmp_path / "x")
    assert store.verify(out).ok


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_extract_refuses_more_than_max_bytes_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    path.write_bytes(tar_of([("a", b"x" * 1000), ("b", b"y" * 1000)]))
    with pytest.raises(ValueError, match=r"more than max_bytes=1500 bytes; pass a larger max_bytes"):
        extract_archive(str(path), tmp_path / "out", max_bytes=1500)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["a.tar"]
    assert sorted(os.listdir(extract_archive(str(path), tmp_path / "out", max_bytes=2000))) == ["a", "b"]


@pytest.mark.timeout(60)
def test_extract_refuses_a_header_claiming_a_terabyte_without_reading_on(tmp_path: Path) -> None:
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.size = 1 << 40
    path = tmp_path / "lie.tar"
    path.write_bytes(info.tobuf() + b"\0" * 1024)  # a header, then almost nothing
    with pytest.raises(ValueError, match=r"more than max_bytes=68719476736 bytes"):
        extract_archive(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_refuses_more_than_the_manifest_lists(
    small_and_big: tuple[CheckpointStore, str, str], tmp_path: Path
) -> None:
    store, small, _ = small_and_big
    tar = tmp_path / "c.tar"
    store.archive(small, str(tar))
    with tarfile.open(tar) as original:
        members = [(m.name, original.extractfile(m).read()) for m in original.getmembers()]  # type: ignore[union-attr]
    tar.write_bytes(tar_of([*members, ("padding.bin", b"\0" * 10_000)]))
    with pytest.raises(ValueError, match=rf"more than the \d+ its {MANIFEST} lists"):
        extract_archive(str(tar), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    tar.write_bytes(tar_of([(n, b"{not json" if n == MANIFEST else d) for n, d in members]))
    with pytest.raises(CheckpointFormatError, match=rf"c\.tar:{MANIFEST}"):
        extract_archive(str(tar), tmp_path / "out")


@pytest.mark.parametrize("names", [["a", "a"], ["a", "./a"]], ids=["same", "dot-slash"])
def test_extract_refuses_duplicate_member_names(tmp_path: Path, names: list[str]) -> None:
    path = tmp_path / "dup.tar"
    path.write_bytes(tar_of([(n, b"first" if i == 0 else b"second") for i, n in enumerate(names)]))
    with pytest.raises(ValueError, match=r"'a' appears twice"):
        extract_archive(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_refuses_a_non_empty_output_directory(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    path.write_bytes(tar_of([("adapter_config.json", b"{}")]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out exists and is not an empty directory; choose an empty or new"):
        extract_archive(str(path), out)
    assert (out / "adapter_config.json").read_text() == "mine" and os.listdir(out) == ["adapter_config.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        extract_archive(str(path), tmp_path / "file")
    (out / "adapter_config.json").unlink()
    assert os.listdir(extract_archive(str(path), out)) == ["adapter_config.json"]  # an empty one is fine
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "file", "out"]  # no staging directory left
    result = cli("extract", str(path), str(out))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not an empty directory" in result.stderr


def test_extract_of_a_non_archive_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "not.tar"
    path.write_bytes(b"hello" * 100)
    with pytest.raises(ValueError, match=r"not\.tar: not a readable tar archive"):
        extract_archive(str(path), tmp_path / "out")


# -- 4. run.json ------------------------------------------------------------------------------------------
@pytest.fixture
def runs(tmp_path: Path) -> tuple[CheckpointStore, Path]:
    """A root with runs good1, bad, good2, each with one checkpoint."""
    root = tmp_path / "ckpts"
    for run_id in ("good1", "bad", "good2"):
        LoRACheckpointIO(root=str(root), run_id=run_id, async_save=False).save_checkpoint(fake_checkpoint(1), "t1")
    return CheckpointStore(str(root)), root


BAD_RUN_FILES = {
    "too large": (b" " * MAX_RUN_BYTES + b"{}", r"larger than 1048576 bytes"),
    "deeply nested": (b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", r"not JSON"),
    "NaN": (b'{"run_id": NaN}', r"not JSON"),
    "wrong type": (None, r"lora_rank is str, expected int"),
    "missing key": (b"{}", r"no key 'run_id'"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN_FILES))
def test_a_bad_run_json_is_a_clear_error_and_hides_no_other_run(
    runs: tuple[CheckpointStore, Path], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    store, root = runs
    raw, message = BAD_RUN_FILES[case]
    if raw is None:
        raw = json.dumps({**json.loads((root / "bad" / RUN_FILE).read_text()), "lora_rank": "4"}).encode()
    (root / "bad" / RUN_FILE).write_bytes(raw)
    with pytest.raises(CheckpointFormatError, match=rf"Invalid run metadata .*bad/run\.json: .*{message}"):
        store.get_run("bad")
    with caplog.at_level(logging.WARNING, logger="lightning_lora_ckpt.storage.store"):
        assert [r.run_id for r in store.list_runs()] == ["good1", "good2"]
    assert "Skipping run 'bad'" in caplog.text
    assert store.list_user_checkpoints().cursor.total_count == 3
    listed = cli("list", "--root", str(root), "--json")
    assert listed.returncode == 0 and len(json.loads(listed.stdout)["checkpoints"]) == 3
    one = cli("list", "bad", "--root", str(root))
    assert (
        one.returncode == 1 and one.stderr.startswith("error: Invalid run metadata") and "Traceback" not in one.stderr
    )


@pytest.mark.timeout(60)
def test_a_fifo_run_json_or_manifest_never_blocks_a_listing(runs: tuple[CheckpointStore, Path]) -> None:
    store, root = runs
    (root / "bad" / RUN_FILE).unlink()
    os.mkfifo(root / "bad" / RUN_FILE)
    manifest = root / "good2" / "weights" / "t1" / MANIFEST
    manifest.unlink()
    os.mkfifo(manifest)
    with pytest.raises(CheckpointFormatError, match=r"run\.json is not a regular file"):
        store.get_run("bad")
    assert [r.run_id for r in store.list_runs()] == ["good1", "good2"]
    store.reindex("good2")  # listings then read good2 from its manifests (as without an index)
    assert store.list_user_checkpoints().cursor.total_count == 2  # good2's unreadable manifest is left out


def test_a_huge_manifest_is_skipped_by_listings(runs: tuple[CheckpointStore, Path]) -> None:
    store, root = runs
    with open(root / "good2" / "weights" / "t1" / MANIFEST, "r+b") as f:
        f.truncate(8 << 30)  # sparse: a listing that read it whole would take 8 GiB
    store.reindex("good2")  # reads every manifest of the run, as a listing without an index does
    assert [c.run_id for c in store.list_user_checkpoints().checkpoints] == ["bad", "good1"]


# -- 5. the command line ----------------------------------------------------------------------------------
def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_list_of_a_missing_root_is_an_error(tmp_path: Path) -> None:
    line = one_line_error(cli("list", "--root", str(tmp_path / "does" / "not" / "exist")))
    assert "No checkpoint root at" in line and "check --root or $LORA_CKPT_ROOT" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("list", "--root", str(empty), "--json").returncode == 0  # an existing, empty root lists nothing


@pytest.mark.timeout(120)
def test_storage_errors_are_one_line(tmp_path: Path) -> None:
    unreachable = json.dumps(
        {
            "key": "bogus",
            "secret": "bogus",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
        }
    )
    line = one_line_error(cli("list", "--root", "s3://nonexistent-bucket-xyz", "--storage-options", unreachable))
    assert "s3://nonexistent-bucket-xyz" in line and "--storage-options" in line
    line = one_line_error(cli("info", "s3://nonexistent-bucket-xyz/run/weights/t", "--storage-options", unreachable))
    assert "nonexistent-bucket-xyz" in line
    traced = cli("list", "--root", str(tmp_path / "missing"), "--debug")
    assert traced.returncode != 0 and "Traceback" in traced.stderr


def test_a_missing_filesystem_package_is_one_line() -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed")
    line = one_line_error(cli("list", "--root", "gs://x"))
    assert "gcsfs" in line


def run_cli_without_stdin(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line with stdin closed (as under cron or nohup)."""
    return subprocess.run(
        ["bash", "-c", 'exec "$0" "$@" <&-', sys.executable, "-m", "lightning_lora_ckpt", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_delete_and_gc_without_a_terminal_ask_for_y(tmp_path: Path) -> None:
    io_ = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False)
    io_.save_checkpoint(fake_checkpoint(1), "t1", {"ttl_seconds": 1})
    io_.save_checkpoint(fake_checkpoint(2), "t2")
    time.sleep(1.1)
    for result in (
        run_cli_without_stdin("delete", "lora://run/weights/t2", "--root", str(tmp_path)),
        cli("delete", "lora://run/weights/t2", "--root", str(tmp_path)),  # stdin an empty pipe
        run_cli_without_stdin("gc", "--root", str(tmp_path)),
    ):
        line = one_line_error(result)
        assert "stdin is not a terminal; pass -y" in line and "EOFError" not in result.stderr
    assert len(CheckpointStore(str(tmp_path)).list_checkpoints("run")) == 2  # nothing deleted


def make_leftover(run_dir: Path) -> Path:
    """What an interrupted local save leaves: a hidden temporary folder (its age is its ctime: now)."""
    leftover = run_dir / "weights" / f".t9.tmp-{uuid.uuid4().hex}"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"partial")
    return leftover


def test_gc_y_sweeps_leftovers_even_when_nothing_expired(tmp_path: Path) -> None:
    LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False).save_checkpoint(fake_checkpoint(1), "t1")
    leftover = make_leftover(tmp_path / "run")
    kept = cli("gc", "-y", "--json", "--root", str(tmp_path))  # fresh (a save in flight?): kept for a day
    assert kept.returncode == 0 and json.loads(kept.stdout)["leftovers"] == [] and leftover.exists(), kept.stderr
    sweep = ("--incomplete-after", "0", "--json", "--root", str(tmp_path))
    dry = json.loads(cli("gc", "--dry-run", *sweep).stdout)
    assert dry["deleted"] == [] and dry["leftovers"] == [str(leftover)] and leftover.exists()
    out = cli("gc", "-y", *sweep)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["leftovers"] == [str(leftover)]
    assert not leftover.exists()
    assert [c.checkpoint_id for c in CheckpointStore(str(tmp_path)).list_checkpoints("run")] == ["weights/t1"]


def test_gc_deletes_only_what_was_planned(tmp_path: Path) -> None:
    io_ = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False)
    for step, name in enumerate(("a", "b", "c"), 1):
        io_.save_checkpoint(fake_checkpoint(step), name, {"ttl_seconds": 1})
    io_.save_checkpoint(fake_checkpoint(9), "newest")
    store = CheckpointStore(str(tmp_path))
    time.sleep(1.1)
    planned = store.gc(dry_run=True)
    assert [c.checkpoint_id for c in planned] == ["weights/a", "weights/b", "weights/c"]
    fresh = make_leftover(tmp_path / "run")  # appears after the plan: not part of it
    store.publish(planned[1].path)  # published after the plan: kept
    deleted = store.gc(only=[planned[0].path, planned[1].path], incomplete_after=0)
    assert [c.checkpoint_id for c in deleted] == ["weights/a"]
    assert {c.checkpoint_id for c in store.list_checkpoints("run")} == {"weights/b", "weights/c", "weights/newest"}
    assert fresh.exists()


def test_verify_does_not_import_lightning(tmp_path: Path) -> None:
    LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False).save_checkpoint(fake_checkpoint(1), "t1")
    code = (
        "import sys\n"
        "from lightning_lora_ckpt.tools.cli import main\n"
        f"rc = main(['verify', 'lora://run/weights/t1', '--root', {str(tmp_path)!r}, '--json'])\n"
        "print(rc, sorted(m for m in ('lightning', 'pytorch_lightning', 'lightning_fabric', 'transformers', 'peft')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 []"
