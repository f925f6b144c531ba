"""The vLLM resolver plugin's decisions without vLLM (tools/vllm_resolver.py): name grammar, a local root served
from its own directories, the verified, content-addressed cache of a remote (``memory://``) root, and each refusal
with its reason. tests/test_vllm_resolver.py runs it in a real server."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import types
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

from helpers.serving import train_sampler
from lightning_lora_ckpt.format.manifest import ADAPTER_WEIGHTS
from lightning_lora_ckpt.modeling.base import load_config
from lightning_lora_ckpt.storage import archive
from lightning_lora_ckpt.storage.commit import retire_checkpoint
from lightning_lora_ckpt.storage.read import read_manifest
from lightning_lora_ckpt.tools import vllm_resolver
from lightning_lora_ckpt.tools.vllm_resolver import (
    CheckpointName,
    CheckpointResolver,
    ResolveRefused,
    lora_int_id,
    parse_model_name,
)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("run/sampler_weights/final", CheckpointName("run", "sampler", "final")),
        ("run/weights/epoch=1-step=8", CheckpointName("run", "training", "epoch=1-step=8")),
        ("lora://run/sampler_weights/s.1", CheckpointName("run", "sampler", "s.1")),
        ("run/sampler_weights/s@DEADbeef", CheckpointName("run", "sampler", "s", "deadbeef")),
        ("lora://r/weights/s@" + "a" * 64, CheckpointName("r", "training", "s", "a" * 64)),
    ],
)
def test_names_parse(model: str, expected: CheckpointName) -> None:
    assert parse_model_name(model) == expected


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("gpt-4", "not a checkpoint name"),
        ("run/sampler_weights", "not a checkpoint name"),
        ("run/other/name", "not a checkpoint name"),
        ("a/run/sampler_weights/name", "not a checkpoint name"),
        ("s3://bucket/run/sampler_weights/name", "not a checkpoint name"),
        ("run/sampler_weights/..", "Invalid checkpoint name"),
        ("run/sampler_weights/a b", "Invalid checkpoint name"),
        (".run/sampler_weights/a", "Invalid run id"),
        ("run/sampler_weights/a@abc", "hex digits"),
        ("run/sampler_weights/a@xyz12345", "hex digits"),
        ("run/sampler_weights/a@" + "0" * 65, "hex digits"),
        ("run/sampler_weights/a@", "hex digits"),
    ],
)
def test_malformed_names_are_refused(model: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_model_name(model)


def test_lora_int_id_is_positive() -> None:
    assert lora_int_id("0" * 64) == 1
    assert lora_int_id("f" * 64) > 1
    assert lora_int_id("not-hex") == 1


def _to_memory(local_root: str) -> str:
    """A copy of the checkpoints under ``local_root`` on a fresh ``memory://`` root: a remote root, downloaded from."""
    root = f"memory://resolver-{uuid.uuid4().hex}"
    fsspec.filesystem("memory").put(f"{local_root}/", root, recursive=True)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A local root with a sampler and a training checkpoint of tiny-qwen3, the same root copied to ``memory://``
    (``remote``), and the base's config directory."""
    root = str(tmp_path_factory.mktemp("root"))
    module, sampler = train_sampler(root, "run", "s1", base_model="tiny-qwen3", steps=2)
    training = module.save_state("t1")
    base = tmp_path_factory.mktemp("base")
    load_config("tiny-qwen3").save_pretrained(base)  # config.json only: all the fingerprint check reads
    other = tmp_path_factory.mktemp("other-base")
    load_config("tiny-llama").save_pretrained(other)
    return {
        "root": root,
        "remote": _to_memory(root),
        "sampler": sampler,
        "training": training,
        "base": str(base),
        "other": str(other),
    }


@pytest.fixture
def resolver(checkpoints: dict[str, str], tmp_path: Path) -> CheckpointResolver:
    """A resolver of the local root."""
    return CheckpointResolver(checkpoints["root"], str(tmp_path / "cache"))


@pytest.fixture
def remote(checkpoints: dict[str, str], tmp_path: Path) -> CheckpointResolver:
    """A resolver of the ``memory://`` root: it serves verified copies from its cache."""
    return CheckpointResolver(checkpoints["remote"], str(tmp_path / "cache"))


def _count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = archive.download

    def counted(uri: str, output_dir: str, storage_options: object = None) -> str:
        calls.append(uri)
        return real(uri, output_dir, storage_options)  # type: ignore[arg-type]

    monkeypatch.setattr(archive, "download", counted)
    return calls


def test_a_local_root_is_served_from_its_own_directories(
    resolver: CheckpointResolver, checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads = _count_downloads(monkeypatch)
    assert resolver.resolve(checkpoints["base"], "run/sampler_weights/s1") == checkpoints["sampler"]
    assert resolver.resolve(checkpoints["base"], "lora://run/weights/t1") == checkpoints["training"]
    assert not downloads and not os.path.exists(resolver.cache_dir)


def test_a_remote_root_resolves_into_the_content_addressed_cache_once(
    remote: CheckpointResolver, checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads = _count_downloads(monkeypatch)
    digest = read_manifest(checkpoints["sampler"]).content_sha256
    path = remote.resolve(checkpoints["base"], "run/sampler_weights/s1")
    assert path == os.path.join(remote.cache_dir, digest)
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint.json"]
    # The other spellings of the same checkpoint reuse the verified copy.
    for name in ("lora://run/sampler_weights/s1", f"run/sampler_weights/s1@{digest[:12].upper()}"):
        assert remote.resolve(checkpoints["base"], name) == path
    assert len(downloads) == 1
    assert os.listdir(remote.cache_dir) == [digest]  # no staging leftovers


def test_training_checkpoints_resolve_too(remote: CheckpointResolver, checkpoints: dict[str, str]) -> None:
    path = remote.resolve(checkpoints["base"], "run/weights/t1")
    assert os.path.basename(path) == read_manifest(checkpoints["training"]).content_sha256
    assert os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS))


def test_a_damaged_cached_copy_is_downloaded_again(
    remote: CheckpointResolver, checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = remote.resolve(checkpoints["base"], "run/sampler_weights/s1")
    _flip_a_byte(os.path.join(path, ADAPTER_WEIGHTS))
    downloads = _count_downloads(monkeypatch)
    assert remote.resolve(checkpoints["base"], "run/sampler_weights/s1") == path
    assert len(downloads) == 1
    assert archive._cached_intact(path, read_manifest(checkpoints["sampler"]).content_sha256)
    assert os.listdir(remote.cache_dir) == [os.path.basename(path)]


def test_concurrent_resolutions_download_once(
    remote: CheckpointResolver, checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads = _count_downloads(monkeypatch)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(remote.resolve(checkpoints["base"], "run/sampler_weights/s1")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert len(downloads) == 1


def test_a_copy_another_process_put_in_place_is_used(
    remote: CheckpointResolver, checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers sharing a cache: the second finds the first one's copy (here: made by another resolver)."""
    first = CheckpointResolver(checkpoints["remote"], remote.cache_dir).resolve(checkpoints["base"], "run/weights/t1")
    downloads = _count_downloads(monkeypatch)
    assert remote.resolve(checkpoints["base"], "run/weights/t1") == first
    assert not downloads


@pytest.mark.parametrize("which", ["local", "remote"])
@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("run/sampler_weights/missing", "unknown or unreadable checkpoint: No checkpoint at"),
        ("other/sampler_weights/s1", "unknown or unreadable checkpoint"),
        ("run/sampler_weights/s1@00000000", "content mismatch: .* the name pins 00000000"),
        ("gpt-4", "malformed name"),
    ],
)
def test_refusals_say_why(checkpoints: dict[str, str], tmp_path: Path, which: str, model: str, reason: str) -> None:
    resolver = CheckpointResolver(checkpoints["root" if which == "local" else "remote"], str(tmp_path / "cache"))
    with pytest.raises(ResolveRefused, match=reason):
        resolver.resolve(checkpoints["base"], model)
    assert not os.path.exists(resolver.cache_dir)


def test_the_version_served_is_checked_if_replaced_meanwhile(
    resolver: CheckpointResolver, checkpoints: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint replaced between the resolver's read and the copy: the pin is checked against the copy."""
    digest = read_manifest(checkpoints["sampler"]).content_sha256
    replaced = read_manifest(checkpoints["training"])  # other content
    monkeypatch.setattr(vllm_resolver, "local_copy", lambda *a, **k: (checkpoints["training"], replaced))
    with pytest.raises(ResolveRefused, match=f"content mismatch: .* the name pins {digest[:12]}"):
        resolver.resolve(checkpoints["base"], f"run/sampler_weights/s1@{digest[:12]}")


def test_a_checkpoint_of_another_base_is_refused(resolver: CheckpointResolver, checkpoints: dict[str, str]) -> None:
    with pytest.raises(ResolveRefused, match=r"other base: .* trained on 'tiny-qwen3' .* serves '.*other-base"):
        resolver.resolve(checkpoints["other"], "run/sampler_weights/s1")


def test_an_unreadable_base_skips_the_base_check(
    resolver: CheckpointResolver, checkpoints: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "no-config"
    empty.mkdir()
    for base in (str(empty), "no-such-org/no-such-model"):
        assert resolver.base_fingerprint(base) is None
        assert os.path.isdir(resolver.resolve(base, "run/sampler_weights/s1"))
    assert "checkpoints are not checked against it" in caplog.text


def test_damaged_and_deleted_checkpoints_are_refused(tmp_path: Path, checkpoints: dict[str, str]) -> None:
    root = str(tmp_path / "root")
    module, damaged = train_sampler(root, "run", "damaged", base_model="tiny-qwen3", steps=1)
    deleted = module.save_weights_for_sampler("deleted")
    _flip_a_byte(os.path.join(damaged, ADAPTER_WEIGHTS))
    retire_checkpoint(deleted)
    for served_root in (root, _to_memory(root)):  # verified in place, and verified as downloaded
        resolver = CheckpointResolver(served_root, str(tmp_path / "cache"))
        with pytest.raises(ResolveRefused, match=r"damaged: Checkpoint .* is damaged: adapter_model\.safetensors has"):
            resolver.resolve(checkpoints["base"], "run/sampler_weights/damaged")
        with pytest.raises(ResolveRefused, match=r"deleted: Checkpoint .* was deleted at"):
            resolver.resolve(checkpoints["base"], "run/sampler_weights/deleted")
        assert not os.path.exists(resolver.cache_dir) or os.listdir(resolver.cache_dir) == []  # nothing left behind


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORA_CKPT_ROOT", "s3://bucket/prefix/")
    monkeypatch.setenv("LORA_CKPT_CACHE_DIR", str(tmp_path / "c"))
    resolver = CheckpointResolver()
    assert (resolver.root, resolver.cache_dir) == ("s3://bucket/prefix", str(tmp_path / "c"))
    monkeypatch.delenv("LORA_CKPT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert CheckpointResolver().cache_dir == str(tmp_path / ".cache" / "lightning-lora-ckpt" / "vllm")


def _flip_a_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Just enough of vLLM's resolver API (``vllm.lora.resolver``, ``vllm.lora.request``, ``vllm.logger``) for
    :func:`register` and the resolver it registers, without vLLM: the main venv has none."""
    registry: dict[str, Any] = {}

    class LoRAResolver:
        pass

    class LoRARequest:
        def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
            assert lora_int_id > 0 and lora_path
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    class Registry:
        def get_supported_resolvers(self) -> Any:
            return registry.keys()

        def register_resolver(self, name: str, resolver: Any) -> None:
            registry[name] = resolver

    modules = {
        "vllm": types.ModuleType("vllm"),
        "vllm.lora": types.ModuleType("vllm.lora"),
        "vllm.lora.resolver": types.ModuleType("vllm.lora.resolver"),
        "vllm.lora.request": types.ModuleType("vllm.lora.request"),
        "vllm.logger": types.ModuleType("vllm.logger"),
    }
    modules["vllm.lora.resolver"].LoRAResolver = LoRAResolver  # type: ignore[attr-defined]
    modules["vllm.lora.resolver"].LoRAResolverRegistry = Registry()  # type: ignore[attr-defined]
    modules["vllm.lora.request"].LoRARequest = LoRARequest  # type: ignore[attr-defined]
    modules["vllm.logger"].init_logger = logging.getLogger  # type: ignore[attr-defined]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return registry


def test_register_needs_a_root_and_registers_once(
    fake_vllm: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("LORA_CKPT_ROOT", raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "lightning_lora_ckpt")
    vllm_resolver.register()
    assert not fake_vllm
    assert "LORA_CKPT_ROOT is not set" in caplog.text
    monkeypatch.setenv("LORA_CKPT_ROOT", "/nowhere")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    vllm_resolver.register()
    first = fake_vllm["lightning-lora-ckpt"]
    vllm_resolver.register()  # vLLM loads plugins more than once
    assert fake_vllm == {"lightning-lora-ckpt": first}
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in caplog.text


def test_the_registered_resolver_answers_in_a_thread(
    fake_vllm: dict[str, Any],
    checkpoints: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("LORA_CKPT_ROOT", checkpoints["root"])
    monkeypatch.setenv("LORA_CKPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    vllm_resolver.register()
    assert "vLLM never asks the checkpoint resolver" in caplog.text
    resolver = fake_vllm["lightning-lora-ckpt"]
    threads: list[str] = []
    real = resolver.resolver.resolve

    def resolve(base: str, model: str) -> str:
        threads.append(threading.current_thread().name)
        return real(base, model)

    resolver.resolver.resolve = resolve
    request = asyncio.run(resolver.resolve_lora(checkpoints["base"], "run/sampler_weights/s1"))
    # A local root: served from the checkpoint's own directory.
    assert (request.lora_name, request.lora_path) == ("run/sampler_weights/s1", checkpoints["sampler"])
    assert threads and threads[0] != threading.main_thread().name  # never on vLLM's event loop
    assert asyncio.run(resolver.resolve_lora(checkpoints["base"], "run/sampler_weights/nope")) is None
    refusals = [r for r in caplog.records if "not serving 'run/sampler_weights/nope'" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    assert "unknown or unreadable checkpoint" in refusals[0].getMessage()
