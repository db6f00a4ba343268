"""The one record of a generation run that analysis, the app, the CLI and exports all read.

Arrays are numpy; everything else is JSON-able. `save(path)` writes a single `.npz` (arrays + a JSON metadata entry)
or a single `.json` (arrays as typed nested lists); `Trace.load` reads either back without loss.
Shapes: L language layers, T prompt tokens, Q captured text queries, E decode evictions, G generated tokens.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .layout import TokenLayout
from .policies import EVICTABLE_LAYERS, TGVDetails, method_kind

TRACE_FORMAT = "tgvkv-trace/1"
TEXT, VISION = 0, 1  # modality indices of block_sums
MAX_THUMBNAIL_SIDE = 1024  # px: a trace keeps small copies of its images, never the originals


@dataclass
class Trace:
    # -- run -------------------------------------------------------------------------------------------------
    model: str
    method: str
    keep_ratio: float
    protocol: str  # "official" (first token from the full cache) | "strict" (first token from the evicted cache)
    question: str
    layout: TokenLayout
    prompt_ids: np.ndarray  # (T,) int64
    num_layers: int
    policy: dict[str, Any] = field(default_factory=dict)  # method + hyper-parameters
    seed: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    image_sha256: list[str] = field(default_factory=list)  # tgvkv.images.pixel_sha256 of each image the model saw
    #: small RGB copies (H, W, 3) uint8 of the input images, in prompt order (figures draw the overlays on them);
    #: stored as PNG bytes; traces saved before they existed load with none
    thumbnails: list[np.ndarray] = field(default_factory=list)
    # -- selection (prefill) ----------------------------------------------------------------------------------
    budgets: np.ndarray | None = None  # (L,) int64 kept prompt tokens per layer
    kept_mask: np.ndarray | None = None  # (L, T) bool, kept after prefill eviction
    scores: np.ndarray | None = None  # (L, T) float32 the policy's ranking scores (NaN where unranked)
    # per-method arrays, as the policy wrote them (read TGV-KV's through `tgv_details()`)
    selection_info: dict[str, np.ndarray] = field(default_factory=dict)
    # -- attention summaries (head-averaged prefill attention) -------------------------------------------------
    block_sums: np.ndarray | None = None  # (L, 2, 2) float32 [query modality, key modality], TEXT=0, VISION=1
    query_positions: np.ndarray | None = None  # (Q,) int64 positions of the captured query rows
    query_rows: np.ndarray | None = None  # (L, Q, T) float32 attention rows of those queries
    column_sums: np.ndarray | None = None  # (L, T) float32 sum over all queries (NaN where not captured)
    attention_maps: np.ndarray | None = None  # (L, T, T) float16 full maps, only for short prompts
    hidden_states: dict[str, np.ndarray] = field(default_factory=dict)  # "layer_k" -> (T, d) float16
    # -- decoding ---------------------------------------------------------------------------------------------
    output_ids: np.ndarray | None = None  # (G,) int64 generated ids (prompt excluded)
    output_text: str = ""
    output_tokens: list[str] = field(default_factory=list)
    # (E, 3) int64 rows of (step, layer, evicted position); step N - T (N: tokens in the cache before the forward that
    # the eviction precedes); steps past the answer belong to the follow-up turn
    decode_evictions: np.ndarray | None = None
    followup_question: str | None = None
    followup_ids: np.ndarray | None = None
    followup_text: str | None = None
    # -- memory and time --------------------------------------------------------------------------------------
    kv_bytes_full: np.ndarray | None = None  # (L,) int64 K+V bytes per layer before eviction
    kv_bytes_kept: np.ndarray | None = None  # (L,) after prefill eviction
    kv_bytes_final: np.ndarray | None = None  # (L,) at the end of generation
    cache_len_final: np.ndarray | None = None  # (L,) physical slots per layer at the end
    timings: dict[str, float] = field(default_factory=dict)  # prefill_s, select_s, decode_s, total_s, tokens_per_s

    # -- derived ----------------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    def kept_positions(self, layer: int) -> np.ndarray:
        """Sorted kept prompt positions of a layer after prefill eviction."""
        if self.kept_mask is None:
            return np.arange(self.seq_len)
        return np.flatnonzero(self.kept_mask[layer])

    def evictable_layers(self) -> np.ndarray:
        """(L,) bool: False for layers the engine never evicts (e.g. Gemma 3's sliding-window layers, which keep their
        own window); recorded in ``selection_info`` (`policies.EVICTABLE_LAYERS`) when some layer is not evictable."""
        mask = self.selection_info.get(EVICTABLE_LAYERS)
        return np.ones(self.num_layers, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)

    def tgv_details(self) -> TGVDetails | None:
        """The typed record of a TGV-KV selection (tgv-kv and every ablation write one); None for other methods and
        for method names this process has not registered. ValueError when a TGV-KV run's record is incomplete."""
        if method_kind(self.method) not in ("tgv", "tgv-ablation"):
            return None
        return TGVDetails.from_info(self.selection_info)

    def largest_evicted_layer(self) -> int:
        """Among the evictable layers, the one with the largest budget (ties: the deepest): where diagnostics open,
        so they show an eviction rather than a layer that keeps everything by construction."""
        b = self.budgets
        if b is None or not len(b):
            return 0
        candidates = np.flatnonzero(self.evictable_layers())
        if not len(candidates):
            return len(b) - 1
        return int(candidates[b[candidates] == b[candidates].max()][-1])

    def kept_fraction(self) -> float:
        return float(self.kept_mask.mean()) if self.kept_mask is not None else 1.0

    def images(self) -> list[Image.Image]:
        """The stored thumbnails as PIL images (empty when the run stored none)."""
        return [Image.fromarray(a) for a in self.thumbnails]

    # -- serialisation ----------------------------------------------------------------------------------------
    def to_parts(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, flat dict of arrays)."""
        meta: dict[str, Any] = {"format": TRACE_FORMAT}
        arrays: dict[str, np.ndarray] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "layout":
                meta["layout"] = v.to_dict()
                arrays.update({f"layout.{k}": a for k, a in v.token_map_arrays().items()})
            elif isinstance(v, np.ndarray):
                arrays[f.name] = v
            elif f.name in ("selection_info", "hidden_states"):
                arrays.update({f"{f.name}.{k}": np.asarray(a) for k, a in v.items()})
                meta[f.name + ".keys"] = list(v)
            elif f.name == "thumbnails":
                arrays.update({f"thumbnails.{i}": _png_bytes(a) for i, a in enumerate(v)})
                meta["thumbnails.count"] = len(v)
            else:
                meta[f.name] = v
        return meta, arrays

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "Trace":
        if meta.get("format") != TRACE_FORMAT:
            raise ValueError(f"not a TGV-KV trace (format {meta.get('format')!r}, expected {TRACE_FORMAT!r})")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "layout":
                tm = {k.split(".", 1)[1]: a for k, a in arrays.items() if k.startswith("layout.")}
                kwargs["layout"] = TokenLayout.from_parts(meta["layout"], tm)
            elif f.name in ("selection_info", "hidden_states"):
                kwargs[f.name] = {k: arrays[f"{f.name}.{k}"] for k in meta.get(f.name + ".keys", [])}
            elif f.name == "thumbnails":
                n = meta.get("thumbnails.count", 0)
                kwargs[f.name] = [_png_pixels(arrays[f"thumbnails.{i}"]) for i in range(n)]
            elif f.name in arrays:
                kwargs[f.name] = arrays[f.name]
            elif f.name in meta:
                kwargs[f.name] = meta[f.name]
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        """Write `.npz` (compressed arrays + JSON metadata) or `.json` (everything as JSON), by suffix."""
        path = Path(path)
        meta, arrays = self.to_parts()
        if path.suffix == ".npz":
            np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **arrays)
        elif path.suffix == ".json":
            doc = {"meta": meta, "arrays": {k: _encode_array(a) for k, a in arrays.items()}}
            path.write_text(json.dumps(doc))
        else:
            raise ValueError(f"trace path must end in .npz or .json, got {path.name!r}")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        path = Path(path)
        try:
            if path.suffix == ".npz":
                if path.is_file() and not zipfile.is_zipfile(path):
                    raise ValueError("not an .npz archive")  # numpy would call it 'pickled data'
                with np.load(path, allow_pickle=False) as z:
                    if "__meta__" not in z.files:
                        held = sorted(z.files)[:5]
                        raise ValueError(f"not a TGV-KV trace (no __meta__ entry; the archive holds {held})")
                    meta = json.loads(str(z["__meta__"]))
                    arrays = {k: z[k] for k in z.files if k != "__meta__"}
            elif path.suffix == ".json":
                doc = json.loads(path.read_text())
                meta, arrays = doc["meta"], {k: _decode_array(v) for k, v in doc["arrays"].items()}
            else:
                raise ValueError(f"trace path must end in .npz or .json, got {path.name!r}")
            return cls.from_parts(meta, arrays)
        except (OSError, KeyError, TypeError, AttributeError, ValueError, json.JSONDecodeError) as e:
            # a hand-edited or foreign file: wrong JSON shape (TypeError), missing entries (KeyError), bad arrays
            reason = f"missing entry {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"could not load trace {path.name!r}: {reason}") from e

    def to_json(self) -> str:
        meta, arrays = self.to_parts()
        return json.dumps({"meta": meta, "arrays": {k: _encode_array(a) for k, a in arrays.items()}})


def make_thumbnail(image: Image.Image, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 copy of `image` with its longer side at most `max_side` px (aspect ratio kept)."""
    if not 1 <= max_side <= MAX_THUMBNAIL_SIDE:
        raise ValueError(f"thumbnail side must be in [1, {MAX_THUMBNAIL_SIDE}] px, got {max_side!r}")
    image = image.convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8).copy()


def _png_bytes(pixels: np.ndarray) -> np.ndarray:
    """A thumbnail as its PNG file, one uint8 per byte (compact in .npz and .json alike)."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or max(a.shape[:2]) > MAX_THUMBNAIL_SIDE:
        raise ValueError(f"a thumbnail must be (H, W, 3) uint8 with sides <= {MAX_THUMBNAIL_SIDE}, got "
                         f"{a.dtype} {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _png_pixels(data: np.ndarray) -> np.ndarray:
    with Image.open(io.BytesIO(np.asarray(data, dtype=np.uint8).tobytes())) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.asarray(a)
    if a.dtype.kind == "f":
        # NaN/inf are not JSON: encode as strings; float16/32 values survive the float64 round trip exactly.
        flat = [x if np.isfinite(x) else repr(float(x)) for x in a.astype(np.float64).ravel().tolist()]
    else:
        flat = a.ravel().tolist()
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": flat}


def _decode_array(d: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    if dtype.kind == "f":
        data = [float(x) for x in d["data"]]  # float("nan") parses the encoded strings
    else:
        data = d["data"]
    return np.asarray(data, dtype=dtype).reshape(d["shape"])
