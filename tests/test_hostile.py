"""Hostile and broken checkpoints: every public entry point that reads one refuses it clearly and runs nothing.

Each case tampers with a real training checkpoint, mostly keeping the manifest's checksums in step so
that only the format checks stand in the way, then loads it through each entry point that reads the
tampered file. The parsers of ``checkpoint.json`` and ``training_state.json`` are fuzzed with hypothesis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import (
    CheckpointFormatError,
    CheckpointStore,
    LoRACheckpointIO,
    LoRAModule,
    SamplingClient,
    merge_adapter,
)
from lightning_lora_ckpt.format.digests import ALGORITHMS, DEFAULT_ALGORITHM
from lightning_lora_ckpt.format.manifest import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    MAX_FILE_BYTES,
    STATE_JSON,
    STATE_TENSORS,
    BaseModelRef,
    FileEntry,
    Manifest,
)
from lightning_lora_ckpt.format.state_codec import decode_state, encode_state
from lightning_lora_ckpt.format.strict_json import load_json_object

ADAPTER = (MANIFEST, ADAPTER_WEIGHTS, ADAPTER_CONFIG)
EVERYTHING = (*ADAPTER, STATE_TENSORS, STATE_JSON)


@dataclasses.dataclass
class Env:
    root: Path
    client: SamplingClient  # a client on the same base, for hotloading
    out: Path  # where merge_adapter would write


def _verify(env: Env, uri: str) -> None:
    report = CheckpointStore(str(env.root)).verify(uri)
    if not report.ok:
        raise CheckpointFormatError("; ".join(report.problems))


#: entry point -> (how it loads a checkpoint, the files it reads)
ENTRIES: dict[str, tuple[Callable[[Env, str], Any], tuple[str, ...]]] = {
    "load_checkpoint": (
        lambda env, uri: LoRACheckpointIO(str(env.root), async_save=False).load_checkpoint(uri),
        EVERYTHING,
    ),
    "from_checkpoint": (lambda env, uri: LoRAModule.from_checkpoint(uri), ADAPTER),
    "from_checkpoint_with_optimizer": (
        lambda env, uri: LoRAModule.from_checkpoint(uri, with_optimizer=True),
        EVERYTHING,
    ),
    "store.get": (lambda env, uri: CheckpointStore(str(env.root)).get(uri), (MANIFEST,)),
    "store.verify": (_verify, EVERYTHING),
    "SamplingClient.from_checkpoint": (lambda env, uri: SamplingClient.from_checkpoint(uri), ADAPTER),
    "hotload": (lambda env, uri: env.client.load_adapter(uri), ADAPTER),
    "merge_adapter": (lambda env, uri: merge_adapter(uri, env.out), ADAPTER),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real training checkpoint of the tiny model, never modified (cases work on copies)."""
    root = tmp_path_factory.mktemp("pristine")
    io_ = LoRACheckpointIO(root=str(root), run_id="run", async_save=False)
    module = LoRAModule(**MODULE_KWARGS)
    make_trainer(io_, max_steps=2).fit(module, batch_loader(2))
    return Path(module.save_state("t"))


@pytest.fixture(scope="module")
def client(pristine: Path) -> SamplingClient:
    return SamplingClient.from_checkpoint(str(pristine))


@pytest.fixture
def env(pristine: Path, client: SamplingClient, tmp_path: Path) -> Env:
    shutil.copytree(pristine, tmp_path / "root" / "run" / "weights" / "t")
    return Env(tmp_path / "root", client, tmp_path / "merged")


# -- tampering ----------------------------------------------------------------------------------------------
def read_manifest_json(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MANIFEST).read_text())


def write_manifest_json(ckpt: Path, data: dict[str, Any]) -> None:
    (ckpt / MANIFEST).write_text(json.dumps(data))


def replace_file(ckpt: Path, name: str, data: bytes) -> None:
    """Swap a file's content and list the new content's size and sha256 in the manifest."""
    (ckpt / name).write_bytes(data)
    manifest = read_manifest_json(ckpt)
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest_json(ckpt, manifest)


def edit_manifest(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def tamper(ckpt: Path) -> None:
        manifest = read_manifest_json(ckpt)
        change(manifest)
        write_manifest_json(ckpt, manifest)

    return tamper


def edit_json(name: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def tamper(ckpt: Path) -> None:
        data = json.loads((ckpt / name).read_text())
        change(data)
        replace_file(ckpt, name, json.dumps(data).encode())

    return tamper


def with_content(name: str, make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda ckpt: replace_file(ckpt, name, make((ckpt / name).read_bytes()))


def link_outside(name: str) -> Callable[[Path], None]:
    """Make ``name`` a symlink to an identical copy outside the checkpoint (its checksum still matches)."""

    def tamper(ckpt: Path) -> None:
        outside = ckpt.parent.parent.parent.parent / f"outside-{name}"
        shutil.move(ckpt / name, outside)
        (ckpt / name).symlink_to(outside)

    return tamper


def fifo(name: str) -> Callable[[Path], None]:
    def tamper(ckpt: Path) -> None:
        (ckpt / name).unlink()
        os.mkfifo(ckpt / name)  # reading it would block forever

    return tamper


def sparse_tail(name: str) -> Callable[[Path], None]:
    """Grow ``name`` to 64 GiB (sparse) behind the manifest's back: it must be refused without reading it."""

    def tamper(ckpt: Path) -> None:
        with open(ckpt / name, "r+b") as f:
            f.truncate(64 << 30)

    return tamper


def set_key(path: str | tuple[str, ...], value: Any = None, delete: bool = False) -> Callable[[dict[str, Any]], None]:
    """A change setting (or deleting) the value at ``path``, a key or a tuple of nested keys."""

    def change(data: dict[str, Any]) -> None:
        *parents, last = (path,) if isinstance(path, str) else path
        for key in parents:
            data = data[key]
        if delete:
            del data[last]
        else:
            data[last] = value

    return change


def rename_file_entry(new: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["files"][new] = data["files"].pop(ADAPTER_CONFIG)

    return change


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def raw_manifest(make: Callable[[str], str]) -> Callable[[Path], None]:
    """Rewrite checkpoint.json as text: ``make`` gets the valid text."""
    return lambda ckpt: (ckpt / MANIFEST).write_bytes(
        make((ckpt / MANIFEST).read_text()).encode("utf-8", "surrogateescape")
    )


def safetensors_header(header: dict[str, Any], body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# -- pickles disguised as checkpoint files ---------------------------------------------------------------
class Payload:
    """Unpickling this runs a shell command creating ``marker``."""

    marker: Path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def make_pickle(marker: Path, style: str) -> bytes:
    evil = Payload()
    evil.marker = marker
    if style == "pickle":
        return pickle.dumps(evil, protocol=2)
    buffer = io.BytesIO()
    torch.save({"weight": evil}, buffer)  # a zip whose data.pkl runs the payload
    return buffer.getvalue()


def load_everywhere(env: Env, target: str, message: str) -> list[str]:
    """Load the checkpoint through every entry point reading ``target``: each must raise matching ``message``."""
    uri = str(env.root / "run" / "weights" / "t")
    tried = []
    for name, (load, reads) in ENTRIES.items():
        if target not in reads:
            continue
        with pytest.raises(ValueError, match=message) as info:
            load(env, uri)
        assert isinstance(info.value, CheckpointFormatError), (name, info.value)
        tried.append(name)
    assert not env.out.exists()
    return tried


@pytest.mark.parametrize("style", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", [ADAPTER_WEIGHTS, STATE_TENSORS, STATE_JSON, ADAPTER_CONFIG, MANIFEST])
def test_pickles_disguised_as_checkpoint_files_never_run(env: Env, tmp_path: Path, name: str, style: str) -> None:
    marker = tmp_path / "pwned"
    payload = make_pickle(marker, style)
    ckpt = env.root / "run" / "weights" / "t"
    if name == MANIFEST:
        (ckpt / name).write_bytes(payload)
    else:
        replace_file(ckpt, name, payload)  # checksums match: only the format check stops it
    formats = {ADAPTER_WEIGHTS: "not a valid safetensors file", STATE_TENSORS: "not a valid safetensors file"}
    tried = load_everywhere(env, name, f"{re.escape(name)}.*{formats.get(name, 'not JSON')}")
    assert len(tried) >= 3
    assert not marker.exists()
    if style == "pickle":  # the payload is live: unpickling it does run the command
        pickle.loads(payload)
        assert marker.exists()


CASES: list[tuple[str, str, Callable[[Path], None], str]] = [
    # (id, the file whose reading must refuse it, tampering, the message)
    (
        "wrong digest",
        ADAPTER_WEIGHTS,
        edit_manifest(set_key(("files", ADAPTER_WEIGHTS, DEFAULT_ALGORITHM), "0" * 64)),
        r"damaged: adapter_model\.safetensors has \d+ bytes and blake3 \w+, the manifest says \d+ bytes and 000000",
    ),
    (
        "size too small",
        STATE_JSON,
        edit_manifest(set_key(("files", STATE_JSON, "size"), 10)),
        r"training_state\.json is larger than the 10 bytes the manifest lists",
    ),
    (
        "size too large",
        ADAPTER_CONFIG,
        edit_manifest(set_key(("files", ADAPTER_CONFIG, "size"), 10**6)),
        r"adapter_config\.json has \d+ bytes .* the manifest says 1000000 bytes",
    ),
    (
        "file grown to 64 GiB",
        ADAPTER_WEIGHTS,
        sparse_tail(ADAPTER_WEIGHTS),
        r"adapter_model\.safetensors is larger than the \d+ bytes the manifest lists",
    ),
    ("path ..", MANIFEST, edit_manifest(rename_file_entry("../x")), r"must list exactly .*'\.\./x'"),
    ("absolute path", MANIFEST, edit_manifest(rename_file_entry("/etc/passwd")), r"must list exactly .*'/etc/passwd'"),
    ("path a/../../b", MANIFEST, edit_manifest(rename_file_entry("a/../../b")), r"must list exactly .*'a/\.\./\.\./b'"),
    (
        "extra file",
        MANIFEST,
        edit_manifest(set_key(("files", "../../evil"), {"size": 1, "sha256": "0" * 64})),
        r"must list exactly .*'\.\./\.\./evil'",
    ),
    (
        "symlink outside",
        ADAPTER_CONFIG,
        link_outside(ADAPTER_CONFIG),
        r"unsafe: adapter_config\.json is a link to .*outside-adapter_config\.json, outside the checkpoint directory",
    ),
    (
        "manifest symlink outside",
        MANIFEST,
        link_outside(MANIFEST),
        r"unsafe: checkpoint\.json is a link to .*, outside the checkpoint directory",
    ),
    ("fifo", STATE_JSON, fifo(STATE_JSON), r"unsafe: training_state\.json is not a regular file"),
    (
        "unknown key",
        MANIFEST,
        edit_manifest(set_key("evil", 1)),
        r"manifest .*checkpoint\.json: unknown keys \['evil'\]",
    ),
    ("missing key", MANIFEST, edit_manifest(set_key("step", delete=True)), r"checkpoint\.json: missing key 'step'"),
    ("step as string", MANIFEST, edit_manifest(set_key("step", "4")), r"key 'step': expected int, got '4'"),
    ("rank as bool", MANIFEST, edit_manifest(set_key("lora_rank", True)), r"key 'lora_rank': expected int"),
    ("negative step", MANIFEST, edit_manifest(set_key("step", -1)), r"key 'step': expected a non-negative integer"),
    ("files as list", MANIFEST, edit_manifest(set_key("files", [])), r"key 'files': expected dict"),
    (
        "empty file",
        MANIFEST,
        edit_manifest(set_key(("files", ADAPTER_CONFIG, "size"), 0)),
        r"key 'files': bad size or blake3 for 'adapter_config\.json'",
    ),
    ("bad base_model", MANIFEST, edit_manifest(set_key("base_model", {"name_or_path": "x"})), r"key 'base_model'"),
    (
        "base_model of numbers",
        MANIFEST,
        edit_manifest(set_key("base_model", {"name_or_path": 1, "fingerprint": 2})),
        r"base_model must hold strings",
    ),
    ("bad time", MANIFEST, edit_manifest(set_key("created_at", "yesterday")), r"key 'created_at'"),
    ("bad type", MANIFEST, edit_manifest(set_key("checkpoint_type", "pickle")), r"unknown checkpoint_type 'pickle'"),
    ("run id escaping", MANIFEST, edit_manifest(set_key("run_id", "../../etc")), r"key 'run_id': Invalid run id"),
    ("newer format", MANIFEST, edit_manifest(set_key("format_version", 99)), r"format_version 99; upgrade"),
    (
        "NaN",
        MANIFEST,
        raw_manifest(lambda text: text.replace('"step": 2', '"step": NaN')),
        r"checkpoint\.json: not JSON \(NaN is not a JSON value",
    ),
    (
        "Infinity in metadata",
        MANIFEST,
        raw_manifest(lambda text: text.replace('"user_metadata": {}', '"user_metadata": {"a": -Infinity}')),
        r"not JSON \(-Infinity is not a JSON value",
    ),
    (
        "duplicate key",
        MANIFEST,
        raw_manifest(lambda text: text.replace('"step": 2', '"step": 2, "step": 99')),
        r"not JSON \(duplicate key 'step'",
    ),
    (
        "huge manifest",
        MANIFEST,
        raw_manifest(
            lambda text: text.replace('"user_metadata": {}', f'"user_metadata": {{"a": "{"x" * (2 << 20)}"}}')
        ),
        r"checkpoint\.json: larger than 1048576 bytes, far more than a valid one",
    ),
    (
        "deeply nested manifest",
        MANIFEST,
        raw_manifest(lambda text: text.replace('"user_metadata": {}', f'"user_metadata": {{"a": {nested(100_000)}}}')),
        r"checkpoint\.json: not JSON \(maximum recursion depth",
    ),
    (
        "non-UTF-8 manifest",
        MANIFEST,
        raw_manifest(lambda text: text.replace('"name": "t"', '"name": "\udcff"')),
        r"checkpoint\.json: not JSON \('utf-8' codec can't decode",
    ),
    ("manifest not an object", MANIFEST, raw_manifest(lambda text: "[1, 2]"), r"must hold a JSON object, not list"),
    (
        "state listed over its cap",
        MANIFEST,
        edit_manifest(set_key(("files", STATE_JSON, "size"), 1 << 40)),
        r"training_state\.json is listed with 1099511627776 bytes, more than the \d+ allowed",
    ),
    (
        "state deeply nested",
        STATE_JSON,
        with_content(STATE_JSON, lambda data: f'{{"a": {nested(100_000)}}}'.encode()),
        r"training_state\.json: not JSON \(maximum recursion depth",
    ),
    (
        "state NaN",
        STATE_JSON,
        with_content(STATE_JSON, lambda data: b'{"epoch": NaN}'),
        r"training_state\.json: not JSON \(NaN",
    ),
    (
        "state non-UTF-8",
        STATE_JSON,
        with_content(STATE_JSON, lambda data: b'{"a": "\xff\xfe"}'),
        r"training_state\.json: not JSON",
    ),
    (
        "state missing tensor",
        STATE_JSON,
        with_content(STATE_JSON, lambda data: b'{"a": {"__lora_ckpt__": "tensor", "v": "nope"}}'),
        r"training_state\.json at key 'a': refers to tensor 'nope', which is not in the tensor file",
    ),
    (
        "state unknown tag",
        STATE_JSON,
        with_content(STATE_JSON, lambda data: b'{"a": {"__lora_ckpt__": "pickle", "v": "x"}}'),
        r"training_state\.json at key 'a': malformed tagged value",
    ),
    (
        "truncated safetensors",
        ADAPTER_WEIGHTS,
        with_content(ADAPTER_WEIGHTS, lambda data: data[: len(data) // 2]),
        r"adapter_model\.safetensors is not a valid safetensors file",
    ),
    (
        "safetensors header length 2**62",
        STATE_TENSORS,
        with_content(STATE_TENSORS, lambda data: struct.pack("<Q", 1 << 62) + data[8:]),
        r"training_state\.safetensors is not a valid safetensors file: .*header too large",
    ),
    (
        "safetensors claiming 4 EiB",
        ADAPTER_WEIGHTS,
        with_content(
            ADAPTER_WEIGHTS,
            lambda data: safetensors_header(
                {"w": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 1 << 62]}}, b"\0" * 64
            ),
        ),
        r"adapter_model\.safetensors is not a valid safetensors file",
    ),
    (
        "config rank beside its tensors",
        ADAPTER_CONFIG,
        lambda ckpt: (
            edit_json(ADAPTER_CONFIG, set_key("r", 4096))(ckpt),
            edit_manifest(set_key("lora_rank", 4096))(ckpt),
        ),
        r"adapter_config\.json gives LoRA ranks \[4096\] .* tensors of adapter_model\.safetensors have ranks \[4\]",
    ),
    (
        "config rank pattern",
        ADAPTER_CONFIG,
        edit_json(ADAPTER_CONFIG, set_key("rank_pattern", {"q_proj": 1 << 40})),
        r"gives LoRA ranks \[4, 1099511627776\]",
    ),
    (
        "config rank mismatch",
        ADAPTER_CONFIG,
        edit_json(ADAPTER_CONFIG, set_key("r", "4")),
        r"'r' in adapter_config\.json is '4', the manifest's lora_rank is 4",
    ),
    (
        "config alpha as string",
        ADAPTER_CONFIG,
        edit_json(ADAPTER_CONFIG, set_key("lora_alpha", "8")),
        r"adapter_config\.json has lora_alpha='8', expected int or float",
    ),
    (
        "config targets as numbers",
        ADAPTER_CONFIG,
        edit_json(ADAPTER_CONFIG, set_key("target_modules", [1, 2])),
        r"has target_modules=\[1, 2\], expected module names",
    ),
    (
        "config without alpha",
        ADAPTER_CONFIG,
        edit_json(ADAPTER_CONFIG, set_key("lora_alpha", delete=True)),
        r"adapter_config\.json has no \['lora_alpha'",
    ),
]


@pytest.mark.parametrize(("target", "tamper", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_checkpoints_are_refused_clearly(
    env: Env, target: str, tamper: Callable[[Path], None], message: str
) -> None:
    ckpt = env.root / "run" / "weights" / "t"
    tamper(ckpt)
    assert load_everywhere(env, target, message)


@pytest.mark.parametrize("tamper", [link_outside(ADAPTER_CONFIG), fifo(STATE_JSON)], ids=["link", "fifo"])
def test_download_copies_nothing_from_outside_the_checkpoint(env: Env, tamper: Callable[[Path], None]) -> None:
    ckpt = env.root / "run" / "weights" / "t"
    tamper(ckpt)  # a link to an identical file: the checksums alone would let it through
    with pytest.raises(CheckpointFormatError, match=r"weights/t is unsafe: (training_state|adapter_config)\.json"):
        CheckpointStore(str(env.root)).download(str(ckpt), env.out)
    assert not env.out.exists()


# -- a checkpoint for another module, base or client ---------------------------------------------------------
def resume_into(overrides: dict[str, Any]) -> Callable[[Env, str], Any]:
    def load(env: Env, uri: str) -> None:
        trainer = make_trainer(LoRACheckpointIO(str(env.root), run_id="run", async_save=False), max_steps=4)
        trainer.fit(LoRAModule(**{**MODULE_KWARGS, **overrides}), batch_loader(2), ckpt_path=uri)

    return load


def hotload_onto(base_model: str) -> Callable[[Env, str], Any]:
    def load(env: Env, uri: str) -> None:
        module = LoRAModule(**{**MODULE_KWARGS, "base_model": base_model})
        module.save_weights_and_get_sampling_client().load_adapter(uri)

    return load


OTHER_BASE = (
    r"trained on base model 'tiny-qwen3' \(fingerprint \w+\) and cannot be loaded onto 'tiny-llama' "
    r"\(fingerprint \w+\); pass base_model='tiny-qwen3'"
)
OTHER_RANK = r"weights/t has LoRA r=4 but this module has r=8; build the module with the checkpoint's LoRA settings"
MISMATCHES: dict[str, tuple[Callable[[Env, str], Any], str]] = {
    "resume, other rank": (resume_into({"rank": 8}), OTHER_RANK),
    "resume, other targets": (
        resume_into({"target_modules": ["q_proj", "v_proj"]}),
        r"has LoRA target_modules=\['model\.layers\.0\.mlp\.down_proj', .* but this module has target_modules=",
    ),
    "resume, other base": (resume_into({"base_model": "tiny-llama"}), OTHER_BASE),
    "from_checkpoint, other rank": (lambda env, uri: LoRAModule.from_checkpoint(uri, rank=8), OTHER_RANK),
    "from_checkpoint, other base": (
        lambda env, uri: LoRAModule.from_checkpoint(uri, base_model="tiny-llama"),
        OTHER_BASE,
    ),
    "sampling client, other base": (
        lambda env, uri: SamplingClient.from_checkpoint(uri, base_model="tiny-llama"),
        OTHER_BASE,
    ),
    "hotload onto another base": (hotload_onto("tiny-llama"), OTHER_BASE),
    "merge onto another base": (lambda env, uri: merge_adapter(uri, env.out, base_model="tiny-llama"), OTHER_BASE),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_a_checkpoint_refuses_another_rank_targets_or_base(env: Env, case: str) -> None:
    load, message = MISMATCHES[case]
    uri = str(env.root / "run" / "weights" / "t")
    with pytest.raises(ValueError, match=message):
        load(env, uri)
    assert not env.out.exists()
    assert CheckpointStore(str(env.root)).verify(uri).ok  # the refusal changed nothing


# -- fuzzing the parsers ---------------------------------------------------------------------------------------
def json_like(floats: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | floats | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=16,
    )


json_values = json_like(st.floats())  # with NaN and infinities, which strict JSON refuses
finite_values = json_like(st.floats(allow_nan=False, allow_infinity=False))
names = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}", fullmatch=True)
sha256s = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
times = st.datetimes(timezones=st.just(timezone.utc), min_value=datetime(1970, 1, 2), max_value=datetime(9998, 1, 1))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    checkpoint_type = draw(st.sampled_from(["sampler", "training"]))
    lora_rank = draw(st.integers(0, 512))
    weights: tuple[str, ...] = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
    if lora_rank == 0:  # full-parameter: a Hugging Face model directory, unsharded or in N shards
        shards = draw(st.integers(0, 3))
        weights = ("config.json", "tokenizer.json", "model.safetensors")
        if shards:
            weights = weights[:2] + tuple(f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1))
            weights += ("model.safetensors.index.json",)
    wanted = weights + ((STATE_TENSORS, STATE_JSON) if checkpoint_type == "training" else ())
    files = {
        name: FileEntry(draw(st.integers(1, 1 << 20)), draw(sha256s), draw(st.sampled_from(ALGORITHMS)))
        for name in wanted
    }
    return Manifest(
        checkpoint_type=checkpoint_type,
        run_id=draw(names),
        name=draw(names),
        created_at=draw(times),
        step=draw(st.integers(0, 1 << 40)),
        epoch=draw(st.integers(0, 1000)),
        base_model=BaseModelRef(draw(st.text(max_size=20)), draw(sha256s), draw(st.sampled_from([None, "nf4"]))),
        lora_rank=lora_rank,
        files=files,
        expires_at=draw(st.none() | times),
        public=draw(st.booleans()),
        user_metadata=draw(st.dictionaries(st.text(max_size=8), finite_values, max_size=3)),
        versions=draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
    )


def key_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every value nested in ``doc`` (dict keys and list indices)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    return [prefix] + [p for key, value in items for p in key_paths(value, (*prefix, key))]


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` (a JSON document) with one to three values replaced, deleted or added somewhere inside it."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        *parents, last = draw(st.sampled_from(key_paths(doc)[1:] or [("x",)]))
        container = doc
        for key in parents:
            container = container[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace" or (action == "delete" and isinstance(container, list)):
            container[last] = draw(finite_values)
        elif action == "delete":
            del container[last]
        elif isinstance(container, dict):
            container[draw(st.text(max_size=8))] = draw(finite_values)
        else:
            container.append(draw(finite_values))
    return doc


def parse_or_refuse(raw: bytes) -> Manifest | None:
    """Parse a manifest; a refusal must be a CheckpointFormatError naming it, a parsed one must round-trip."""
    try:
        manifest = Manifest.from_json(raw, "fuzz://checkpoint.json")
    except CheckpointFormatError as err:
        assert "fuzz://checkpoint.json" in str(err)
        return None
    assert Manifest.from_json(manifest.to_json(), "again") == manifest
    return manifest


@settings(max_examples=200, deadline=None)
@given(manifests())
def test_valid_manifests_round_trip(manifest: Manifest) -> None:
    assert parse_or_refuse(manifest.to_json()) == manifest


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests().flatmap(lambda m: mutated(json.loads(m.to_json()))))
def test_mutated_manifests_parse_or_are_refused(doc: Any) -> None:
    parse_or_refuse(json.dumps(doc).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_are_no_manifest(raw: bytes) -> None:
    assert parse_or_refuse(raw) is None


TENSORS = {"t": torch.arange(3.0), "bf": torch.zeros(2, dtype=torch.bfloat16), "i": torch.arange(2)}
tagged = st.builds(
    lambda kind, value: {"__lora_ckpt__": kind, "v": value},
    st.sampled_from(["tensor", "ndarray", "tuple", "map", "bytes", "float", "dtype", "path", "pickle"]),
    st.sampled_from(["t", "bf", "i", "x", "bfloat16", "nan", "AAA=", "", "/etc/passwd"]) | json_values,
)
state_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | tagged,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
        | st.builds(
            lambda pairs: {"__lora_ckpt__": "map", "v": pairs}, st.lists(st.lists(children, max_size=3), max_size=3)
        )
    ),
    max_leaves=16,
)
STATE = {
    "optimizer_states": [
        {"state": {0: {"exp_avg": TENSORS["t"]}}, "param_groups": [{"betas": (0.9, 0.99), "lr": 0.1}]}
    ],
    "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 2}}}, "blob": b"\x00\xff"},
    "misc": {"nan": float("inf"), "dtype": torch.bfloat16, "bf": TENSORS["bf"]},
}


def decode_or_refuse(raw: bytes) -> dict[str, Any] | None:
    try:
        source = "fuzz://training_state.json"
        return decode_state(load_json_object(raw, MAX_FILE_BYTES[STATE_JSON], source), TENSORS, source)
    except CheckpointFormatError as err:
        assert "fuzz://training_state.json" in str(err)
        return None


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), state_trees, max_size=4) | state_trees | st.binary(max_size=200))
def test_training_state_decoder_decodes_or_refuses(tree: Any) -> None:
    decode_or_refuse(tree if isinstance(tree, bytes) else json.dumps(tree).encode())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.just(encode_state(STATE)[0]).flatmap(mutated))
def test_mutated_training_states_decode_or_are_refused(tree: Any) -> None:
    decode_or_refuse(json.dumps(tree).encode())


def test_a_valid_training_state_round_trips() -> None:
    tree, tensors = encode_state(STATE)
    decoded = decode_state(json.loads(json.dumps(tree, allow_nan=False)), tensors, "state")
    assert decoded["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert set(decoded["optimizer_states"][0]["state"]) == {0} and decoded["misc"]["dtype"] is torch.bfloat16
    assert torch.equal(decoded["misc"]["bf"], TENSORS["bf"]) and decoded["loops"]["blob"] == b"\x00\xff"
