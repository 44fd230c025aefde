"""Build OCI image layouts on disk without a daemon (for ``skopeo copy oci:DIR:TAG``).

Layers are real gzip-compressed tar files. Each layer is streamed straight to
its blob file while both digests (compressed blob and uncompressed diff_id)
are computed, so a 512 MiB benchmark layer never sits in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

_CHUNK = 1 << 20  # 1 MiB: generation, hashing and tar copy granularity


@dataclass(frozen=True)
class Layer:
    """What to put in one layer: a single regular file.

    Give ``content`` for exact bytes, or ``size`` for generated data:
    incompressible (a random 1 MiB block repeated, which gzip's 32 KiB window
    cannot exploit, so it is as cheap as it gets) unless ``compressible``.
    ``seed`` makes generated data reproducible across runs. ``compresslevel``
    None means: gzip level 0 (stored blocks) for generated incompressible
    data, where deflate cannot win and level 1 runs at only ~35 MiB/s on this
    class of machine versus ~900 MiB/s; level 1 for everything else.
    """

    size: int | None = None
    content: bytes | None = None
    path: str | None = None
    compressible: bool = False
    seed: int | None = None
    compresslevel: int | None = None

    def __post_init__(self) -> None:
        if (self.size is None) == (self.content is None):
            raise ValueError("give exactly one of size or content")

    @property
    def effective_compresslevel(self) -> int:
        if self.compresslevel is not None:
            return self.compresslevel
        return 0 if self.content is None and not self.compressible else 1

    @property
    def data_size(self) -> int:
        return len(self.content) if self.content is not None else int(self.size or 0)


LayerLike = Layer | int | bytes


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class OciImage:
    """Result of :func:`make_oci_layout`."""

    layout_dir: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]  # compressed blob digests, as in the manifest
    diff_ids: list[str]  # uncompressed tar digests, as in the config
    layer_sizes: list[int] = field(default_factory=list)  # compressed sizes

    @property
    def ref(self) -> str:
        """The skopeo/containers-image source reference, ``oci:DIR:TAG``."""
        return f"oci:{self.layout_dir}:{self.tag}"

    def blob_path(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.layout_dir / "blobs" / algo / hexd


class _HashingWriter(io.RawIOBase):
    """Write-through file wrapper that hashes and counts what passes."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.size += len(b)
        self._target.write(b)
        return len(b)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class _GeneratedReader(io.RawIOBase):
    """Read-only stream of ``size`` bytes from an iterator of chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._pos = 0  # offset into _buf; avoids re-slicing a big buffer per read

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if n is None or n < 0:
            out, self._buf, self._pos = self._buf[self._pos:] + b"".join(self._chunks), b"", 0
            return out
        while len(self._buf) - self._pos < n:
            nxt = next(self._chunks, None)
            if nxt is None:
                break
            self._buf, self._pos = self._buf[self._pos:] + nxt, 0
        # Whole-buffer slices of bytes are free in CPython, so aligned reads copy nothing.
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out


def _data_chunks(layer: Layer) -> Iterator[bytes]:
    if layer.content is not None:
        yield layer.content
        return
    rng = random.Random(layer.seed) if layer.seed is not None else None
    if layer.compressible:
        # Text-like but layer-specific, so distinct layers get distinct digests.
        tag = (rng.randbytes(8) if rng else os.urandom(8)).hex().encode()
        block = (b"localregistry compressible data " + tag + b"\n") * (_CHUNK // 50 + 1)
    else:
        block = rng.randbytes(_CHUNK) if rng else os.urandom(_CHUNK)
    block = block[:_CHUNK]
    remaining = layer.data_size
    while remaining > 0:
        n = min(remaining, len(block))
        yield block if n == len(block) else block[:n]
        remaining -= n


def _as_layer(spec: LayerLike) -> Layer:
    if isinstance(spec, Layer):
        return spec
    if isinstance(spec, int):
        return Layer(size=spec)
    if isinstance(spec, (bytes, bytearray)):
        return Layer(content=bytes(spec))
    raise TypeError(f"layer spec must be Layer, int or bytes, not {type(spec).__name__}")


def _blob_dir(layout: Path) -> Path:
    d = layout / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _commit_blob(layout: Path, tmp: Path, digest: str) -> Path:
    final = _blob_dir(layout) / digest.split(":", 1)[1]
    if final.exists():
        tmp.unlink()  # identical content already stored
    else:
        tmp.replace(final)
    return final


def _write_json_blob(layout: Path, obj: object, media_type: str) -> Descriptor:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = _blob_dir(layout) / digest.split(":", 1)[1]
    if not path.exists():
        path.write_bytes(data)
    return Descriptor(media_type, digest, len(data))


def write_layer_blob(layout: Path, layer: LayerLike, default_path: str,
                     compresslevel: int | None = None) -> tuple[Descriptor, str]:
    """Stream one tar+gzip layer into ``layout``; return (descriptor, diff_id).

    ``compresslevel`` overrides the layer's own (see :class:`Layer`).
    """
    layer = _as_layer(layer)
    if compresslevel is None:
        compresslevel = layer.effective_compresslevel
    tmp = _blob_dir(layout) / f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
    with open(tmp, "wb") as raw:
        compressed = _HashingWriter(raw)
        # mtime=0 and no file name in the gzip header: the bytes depend only
        # on the layer data.
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed,
                           compresslevel=compresslevel, mtime=0) as gz:
            uncompressed = _HashingWriter(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=uncompressed, mode="w|",  # type: ignore[call-overload]
                              format=tarfile.PAX_FORMAT, bufsize=_CHUNK) as tar:
                info = tarfile.TarInfo(layer.path or default_path)
                info.size = layer.data_size
                info.mode = 0o644
                info.mtime = 0
                tar.copybufsize = _CHUNK  # default 16 KiB copies are slow for big layers
                tar.addfile(info, _GeneratedReader(_data_chunks(layer)))
    _commit_blob(layout, tmp, compressed.digest)
    return Descriptor(MT_LAYER_GZIP, compressed.digest, compressed.size), uncompressed.digest


def make_oci_layout(
    directory: Path,
    layers: Sequence[LayerLike],
    *,
    tag: str = "latest",
    labels: dict[str, str] | None = None,
    env: dict[str, str] | list[str] | None = None,
    architecture: str = "amd64",
    compresslevel: int | None = None,
) -> OciImage:
    """Write (or add a tag to) an OCI image layout at ``directory``.

    ``layers`` items are :class:`Layer`, an int (that many incompressible
    bytes) or bytes (exact file content). Each layer holds one file,
    ``layer-N.bin`` unless ``Layer.path`` says otherwise. Re-using a
    directory adds the tag to its ``index.json`` (replacing the same tag).
    ``compresslevel`` forces one gzip level for all layers (None: per layer).
    """
    layout = Path(directory)
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    descs: list[Descriptor] = []
    diff_ids: list[str] = []
    for i, spec in enumerate(layers):
        desc, diff_id = write_layer_blob(layout, spec, f"layer-{i}.bin", compresslevel)
        descs.append(desc)
        diff_ids.append(diff_id)

    env_list = [f"{k}={v}" for k, v in env.items()] if isinstance(env, dict) else list(env or [])
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": env_list, "Labels": dict(labels or {})},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"localregistry layer {i}"}
                    for i in range(len(descs))],
    }
    config_desc = _write_json_blob(layout, config, MT_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in descs],
    }
    manifest_desc = _write_json_blob(layout, manifest, MT_MANIFEST)

    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
    index["manifests"] = [m for m in index.get("manifests", [])
                          if m.get("annotations", {}).get(REF_NAME) != tag]
    index["manifests"].append({**manifest_desc.to_json(), "annotations": {REF_NAME: tag}})
    index_path.write_text(json.dumps(index, indent=2))

    return OciImage(
        layout_dir=layout, tag=tag,
        manifest_digest=manifest_desc.digest, config_digest=config_desc.digest,
        layer_digests=[d.digest for d in descs], diff_ids=diff_ids,
        layer_sizes=[d.size for d in descs],
    )
