"""Numeric tests of the analysis arrays and of the figures built on them (synthetic traces, no model)."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from PIL import Image

from analysis import arrays as A
from analysis import compute as C
from analysis import explain, palette
from analysis.overlay import base_panel, overlay_panels, panel_size, render_kept
from analysis.synthetic import (layout_dynamic, layout_next, layout_square, layout_two_images,
                                synthetic_attention, synthetic_trace)
from tgvkv.geometry import kept_grids
from tgvkv.layout import ImageView

LAYOUTS = {"square": layout_square, "next": layout_next, "dynamic": layout_dynamic, "two_images": layout_two_images}


@pytest.fixture(scope="module")
def traces():
    """One tgv-kv trace per geometry (keep ratios high enough that small prompts keep some patches)."""
    ratios = {"square": 0.3, "next": 0.5, "dynamic": 0.5, "two_images": 0.6}
    return {k: synthetic_trace(f(), num_layers=4, keep_ratio=ratios[k], seed=1) for k, f in LAYOUTS.items()}


# -- block sums --------------------------------------------------------------------------------------------------------
def test_block_sums_hand_example():
    attn = np.array([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]])
    vis = np.array([False, True, True, False])
    got = A.block_sums_from_map(attn, vis)
    # text queries 0, 3: keys text {0, 3} -> 1 + 0.1 + 0.4; keys vision -> 0.2 + 0.3
    np.testing.assert_allclose(got, [[1.5, 0.5], [0.7, 1.3]])
    np.testing.assert_allclose(A.block_entries(vis), [[3, 2], [2, 3]])  # causal (q >= k) entries per block


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_block_sums_equal_attention_totals(name, traces):
    t = traces[name]
    attn = np.asarray(t.attention_maps, dtype=np.float64)
    vis = t.layout.is_vision
    got = A.block_sums_from_map(attn, vis)  # (L, 2, 2)
    for q, qs in enumerate((~vis, vis)):
        for k, ks in enumerate((~vis, vis)):
            np.testing.assert_allclose(got[:, q, k], attn[:, qs][:, :, ks].sum(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=(1, 2)), attn.sum(axis=(1, 2)))  # all four blocks = the whole map
    np.testing.assert_allclose(got.sum(axis=(1, 2)), t.seq_len, rtol=2e-3)  # rows are distributions (float16 maps)
    data = C.compute_attention(t, 2)
    np.testing.assert_allclose(data.block_sums, got[2])
    np.testing.assert_allclose(data.block_sums, t.block_sums[2], rtol=2e-3)


def test_attention_fallback_uses_captured_rows():
    t = synthetic_trace(layout_two_images(), num_layers=3, keep_ratio=0.6, full_maps=False)
    d = C.compute_attention(t, 1)
    assert not d.full and d.log_rows.shape == (len(t.query_positions), t.seq_len)
    np.testing.assert_allclose(d.block_sums, t.block_sums[1])  # the trace's totals, not a partial recount
    attn = synthetic_attention(t.layout, 3, 0)
    rows = attn[1, t.query_positions]
    np.testing.assert_allclose(A.block_sums_from_map(rows, t.layout.is_vision, t.query_positions)[0],
                               A.block_sums_from_map(attn[1], t.layout.is_vision)[0] - _prefix_text_rows(attn[1], t.layout))
    assert np.isnan(d.log_rows[0, t.query_positions[0] + 1:]).all()  # causal mask right of the query
    assert "captured text-query rows only" in explain.attention(d)


def _prefix_text_rows(attn, layout):
    """Block sums of the text queries that were not captured (those before the first image)."""
    vis = layout.is_vision
    pre = np.flatnonzero(~vis)[np.flatnonzero(~vis) < layout.first_vision]
    return np.array([attn[pre][:, ~vis].sum(), attn[pre][:, vis].sum()])


def test_block_rectangles_are_inside_their_blocks():
    vis = layout_two_images().is_vision
    for (q, k), (r0, r1, c0, c1) in A.block_rectangles(vis).items():
        assert np.all(vis[r0:r1] == bool(q)) and np.all(vis[c0:c1] == bool(k)) and c0 < r1


# -- overlay masks -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_overlay_masks_match_kept_indices(name, traces):
    t = traces[name]
    lay, tm = t.layout, t.layout.token_map
    for layer in range(t.num_layers):
        d = C.compute_overlay(t, layer)
        kept_pos = t.kept_positions(layer)
        cells = np.concatenate([d.positions[v][d.kept[v]] for v in range(len(d.views))])
        grid_tokens = tm.positions[tm.view_index >= 0]
        np.testing.assert_array_equal(np.sort(cells), np.intersect1d(kept_pos, grid_tokens))
        for mine, ref in zip(d.kept, kept_grids(lay, kept_pos)):  # the engine's own implementation
            np.testing.assert_array_equal(mine, ref)
        counts = t.kept_mask.sum(axis=0)
        for v in range(len(d.views)):
            np.testing.assert_array_equal(d.layer_counts[v], counts[d.positions[v]])
        assert d.n_kept_vision == np.isin(kept_pos, lay.vision_positions).sum()


def test_view_geometry_by_hand():
    nxt = A.view_position_grids(layout_next(prefix=5))
    assert [g.shape for g in nxt] == [(4, 4), (6, 8)]
    assert nxt[0][0, 0] == 5 and nxt[0][3, 3] == 20  # base grid right after the 5-token prefix
    assert nxt[1][0, 0] == 21 and nxt[1][0, 7] == 28 and nxt[1][1, 0] == 30  # newline at 29 skipped
    assert nxt[1][5, 7] == 21 + 5 * 9 + 7
    dyn = A.view_position_grids(layout_dynamic(prefix=5))
    assert dyn[0].shape == (6, 10) and dyn[0][1, 0] == 15
    two = A.view_position_grids(layout_two_images(prefix=4, between=5))
    assert two[0][0, 0] == 4 and two[1][0, 0] == 4 + 16 + 5


def test_newline_tokens_never_reach_a_cell():
    t = synthetic_trace(layout_next(), num_layers=2, keep_ratio=0.5)
    tm = t.layout.token_map
    newlines = tm.positions[tm.view_index == -1]
    assert len(newlines) == 6
    mask = np.zeros_like(t.kept_mask)
    mask[:, newlines] = True  # keep only the newline tokens
    t.kept_mask = mask
    d = C.compute_overlay(t, 0)
    assert sum(int(k.sum()) for k in d.kept) == 0 and d.n_kept_vision == 6


def test_rendered_panel_greys_evicted_cells_only():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8))
    view = ImageView(0, "image", 3, 3)
    kept = np.zeros((3, 3), dtype=bool)
    kept[1, 2] = kept[0, 0] = True
    base = base_panel(img, view, (120, 120), width=120)
    out = np.asarray(render_kept(base, kept)).astype(int)
    src = np.asarray(base).astype(int)
    for r in range(3):
        for c in range(3):
            y, x = 40 * r + 20, 40 * c + 20  # cell centres, away from grid lines and outlines
            assert np.array_equal(out[y, x], src[y, x]) == bool(kept[r, c])
    neutral = np.asarray(render_kept(base_panel(None, view, None, 120), kept, has_image=False)).astype(int)
    kept_px, evicted_px = neutral[20, 20], neutral[20, 60]
    assert np.argmax(kept_px) == 1 and np.ptp(evicted_px) == 0  # KEPT is bluish green, evicted is plain grey


def test_panel_uses_the_view_box():
    """A dynamic-grid view covering rows 10%..90% of the image never shows the red top band."""
    px = np.zeros((240, 500, 3), dtype=np.uint8)
    px[:24] = (255, 0, 0)
    px[24:] = (0, 0, 255)
    view = ImageView(0, "image", 6, 10, box=(0.1, 0.0, 0.9, 1.0))
    assert panel_size(view, (500, 240), 500) == (500, 192)
    panel = np.asarray(base_panel(Image.fromarray(px), view, (500, 240), 500))
    assert panel[..., 0].max() == 0 and panel[..., 2].min() == 255
    next_panels = overlay_panels(C.compute_overlay(synthetic_trace(layout_next(), 2, 0.5), 0), None)
    assert [p.size for _, p in next_panels] == [(480, 360), (480, 360)]  # 640x480 original, both views whole image


def test_two_images_give_one_panel_per_view_with_its_own_image(traces):
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    d = C.compute_overlay(traces["two_images"], 0)
    panels = overlay_panels(d, [red, blue], "counts")
    assert len(panels) == 2
    means = [np.asarray(p.convert("L").convert("RGB"), dtype=float).mean() for _, p in panels]
    assert means[0] != means[1]  # each panel drew its own image underneath


def test_text_to_image_scores_per_method():
    t = synthetic_trace(layout_square(6), num_layers=3, keep_ratio=0.5)
    s = C.text_to_image_scores(t, 1)
    np.testing.assert_allclose(s[t.layout.vision_positions], t.selection_info["vision_scores"][1])
    assert np.isnan(s[t.layout.text_positions]).all()
    h = synthetic_trace(layout_square(6), num_layers=3, keep_ratio=0.5, method="h2o")
    vpos = h.layout.vision_positions
    expect = h.query_rows[1][:, vpos].sum(axis=0)
    np.testing.assert_allclose(C.text_to_image_scores(h, 1)[vpos], expect, rtol=1e-6)
    d = C.compute_overlay(h, 1, top_k=3)
    best = vpos[np.argsort(-expect, kind="stable")[:3]]
    assert [int(d.positions[v][r, c]) for v, r, c in d.top] == best.tolist()


# -- neighbours --------------------------------------------------------------------------------------------------------
def test_neighbours_orthogonal_clusters():
    rng = np.random.default_rng(0)
    text = np.outer(rng.uniform(0.5, 2, 7), [1.0, 0, 0])
    vision = np.outer(rng.uniform(0.5, 2, 9), [0, 1.0, 0])
    curves = A.neighbour_curves(np.vstack([text, vision]), np.array([False] * 7 + [True] * 9), k_max=5)
    np.testing.assert_allclose(curves["text→text"], 1.0)
    np.testing.assert_allclose(curves["vision→vision"], 1.0)
    np.testing.assert_allclose(curves["text→vision"], 0.0, atol=1e-12)
    np.testing.assert_allclose(curves["vision→text"], 0.0, atol=1e-12)
    assert all(len(c) == 5 for c in curves.values())


def test_neighbours_known_angles():
    ang = np.deg2rad([0.0, 30.0, 90.0])
    pts = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    c30, c60 = np.cos(np.deg2rad(30)), np.cos(np.deg2rad(60))
    got = A.knn_similarity(pts, pts, k_max=5, same_set=True)  # clipped to the 2 other points
    np.testing.assert_allclose(got, [(c30 + c30 + c60) / 3, ((c30 + 0) / 2 + (c30 + c60) / 2 + (c60 + 0) / 2) / 3])
    across = A.knn_similarity(pts[:1], pts[1:], k_max=2, same_set=False)
    np.testing.assert_allclose(across, [c30, (c30 + 0) / 2], atol=1e-12)


def test_neighbours_self_excluded_among_duplicates():
    pts = np.ones((4, 3))
    np.testing.assert_allclose(A.knn_similarity(pts, pts, 10, same_set=True), [1.0, 1.0, 1.0])


def test_projection_separates_modalities(traces):
    d = C.compute_neighbours(traces["square"], layer=None, k_max=4, projection="pca")
    assert d.layer_name == "layer_4" and d.projection.shape == (traces["square"].seq_len, 2)  # keys 0, 2, 4
    assert [C.hidden_layer_name(traces["square"], l) for l in (0, 1, 3)] == ["layer_0", "layer_2", "layer_4"]
    assert C.hidden_label("layer_0") == "input embeddings" and C.hidden_label("layer_4") == "output of layer 3"
    assert "(output of layer 3) cluster by modality" in explain.neighbours(d)
    tsne = A.project_2d(np.random.default_rng(0).normal(size=(30, 5)), "tsne")
    assert tsne.shape == (30, 2)
    with pytest.raises(ValueError, match="projection"):
        A.project_2d(np.ones((3, 2)), "umap")


# -- accumulated attention, budgets, Jaccard ---------------------------------------------------------------------------
def test_top_budget_keep_and_accumulation(traces):
    keep = A.top_budget_keep(np.array([[0.1, 0.5, 0.3, 0.5], [1, 2, 3, 4]]), np.array([2, 1]))
    np.testing.assert_array_equal(keep, [[False, True, False, True], [False, False, False, True]])
    t = traces["square"]
    d = C.compute_accumulated(t)
    np.testing.assert_allclose(d.accumulated, np.asarray(t.attention_maps, np.float64).sum(axis=(0, 1)))
    np.testing.assert_allclose(d.evicted_method, (~t.kept_mask).mean(axis=0))
    assert d.share_method["text"] < 0.05 < 0.5 < d.share_attention_only["text"]  # the paper's Fig. 1c contrast
    t2 = synthetic_trace(layout_two_images(), 2, 0.6, full_maps=False)
    assert C.compute_accumulated(t2).source == "captured text queries only"


def test_budgets_split_by_modality(traces):
    t = traces["next"]
    d = C.compute_budgets([t, synthetic_trace(layout_next(), 4, 0.5, seed=1, method="pyramidkv")])
    np.testing.assert_array_equal(d.text[0] + d.vision[0], t.budgets)
    np.testing.assert_array_equal(d.vision[0], t.kept_mask[:, t.layout.is_vision].sum(axis=1))
    assert d.methods == ["tgv-kv", "pyramidkv"] and d.uniform == pytest.approx(0.5 * t.seq_len)
    assert np.all(np.diff(d.text[1] + d.vision[1]) <= 0)  # PyramidKV: budgets shrink with depth


def test_jaccard_known_sets():
    a, b, c = (np.isin(np.arange(6), s) for s in ([1, 2, 3], [2, 3, 4], []))
    assert A.jaccard(a, b) == 0.5 and A.jaccard(a, c) == 0.0 and A.jaccard(c, c) == 1.0
    pairs, vals = A.pairwise_jaccard([a[None], b[None], a[None]])
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(vals, [[0.5], [1.0], [0.5]])


def test_comparison_checks_inputs(traces):
    t = traces["square"]
    with pytest.raises(ValueError, match="at least two"):
        C.compute_comparison([t], 0)
    with pytest.raises(ValueError, match="same prompt"):
        C.compute_comparison([t, traces["next"]], 0)
    d = C.compute_comparison([t, t], 0)
    np.testing.assert_allclose(d.jaccard, 1.0)
    assert d.methods == ["tgv-kv (1)", "tgv-kv (2)"]


# -- figures -----------------------------------------------------------------------------------------------------------
def _figure_cases(t, other):
    cmp = C.compute_comparison([t, other], 1)
    return {  # name: (data, extra args, expected plotly traces, expected matplotlib axes incl. colorbars)
        "neighbours": (C.compute_neighbours(t, 3, k_max=4), (), 6, 2),
        "attention": (C.compute_attention(t, 1), (), 2, 3),
        "accumulated": (C.compute_accumulated(t), (), 3, 3),
        "overlay": (C.compute_overlay(t, 1), (None,), 4 * len(t.layout.views), 2 * len(t.layout.views) + 1),
        "budgets": (C.compute_budgets([t, other]), (), 4, 1),
        "comparison": (cmp, (None,), 2 + 2 * 2 * len(t.layout.views), 1 + 2 * len(t.layout.views)),
    }


@pytest.mark.parametrize("name", ["square", "next"])
def test_figures_build_in_both_backends(name, traces):
    from analysis import plots_mpl, plots_plotly

    t = traces[name]
    other = synthetic_trace(LAYOUTS[name](), 4, t.keep_ratio, seed=1, method="snapkv")
    for kind, (data, extra, n_traces, n_axes) in _figure_cases(t, other).items():
        pfig = getattr(plots_plotly, f"plot_{kind}")(data, *extra)
        mfig = getattr(plots_mpl, f"plot_{kind}")(data, *extra)
        caption = getattr(explain, kind)(data)
        assert len(pfig.data) == n_traces, kind
        assert len(mfig.axes) == n_axes, kind
        assert pfig.layout.title.text == caption
        assert mfig.get_suptitle().replace("\n", " ") == caption
        assert mfig.dpi >= 150 and all(tx.get_fontsize() >= 14 for tx in mfig.axes[0].texts if tx.get_text())
    assert matplotlib.rcParams["font.size"] == matplotlib.rcParamsDefault["font.size"]  # style stayed local


def test_modality_colours_are_shared(traces):
    from analysis import plots_mpl, plots_plotly

    d = C.compute_accumulated(traces["square"])
    pfig = plots_plotly.plot_accumulated(d)
    assert [tr.marker.color for tr in pfig.data[:2]] == [palette.TEXT, palette.VISION]
    bars = plots_mpl.plot_accumulated(d).axes[0].containers
    got = [matplotlib.colors.to_hex(b.patches[0].get_facecolor()).upper() for b in bars]
    assert got == [palette.TEXT, palette.VISION]


def test_plotly_hover_names_tokens(traces):
    from analysis import plots_plotly

    t = traces["square"]
    fig = plots_plotly.plot_attention(C.compute_attention(t, 0))
    assert fig.data[0].hovertext[150][7].startswith(f"query {t.layout.tokens[150]!r} @ 150")
    ov = plots_plotly.plot_overlay(C.compute_overlay(t, 0))
    pos = A.view_position_grids(t.layout)[0]
    assert f"position {pos[2, 3]}" in ov.data[1].hovertext[2][3]


def test_explain_overlay_states_counts(traces):
    t = traces["square"]
    d = C.compute_overlay(t, 2)
    n = int(t.kept_mask[2, t.layout.vision_positions].sum())
    v, r, c = d.top[0]
    assert explain.overlay(d) == f"Layer 2 (tgv-kv) keeps {n} of 144 patches; top text→image patch: image row {r} col {c}"


# -- CLI ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_cli_renders_saved_trace(tmp_path, suffix):
    from analysis.figures import main

    t = synthetic_trace(layout_two_images(), 3, 0.6)
    other = synthetic_trace(layout_two_images(), 3, 0.6, method="h2o")
    t.hidden_states = {} if suffix == ".json" else t.hidden_states
    paths = [t.save(tmp_path / f"a{suffix}"), other.save(tmp_path / f"b{suffix}")]
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "img.png")
    out = tmp_path / "figs"
    formats = "png" if suffix == ".npz" else "png,svg,pdf"
    args = ["--trace", str(paths[0]), "--out", str(out), "--layer", "1", "--formats", formats]
    args += ["--html"] if suffix == ".json" else []
    if suffix == ".npz":
        args += ["--compare", str(paths[1]), "--image", str(tmp_path / "img.png"), str(tmp_path / "img.png")]
    assert main(args) == 0
    caps = json.loads((out / "captions.json").read_text())
    names = {"attention", "accumulated", "overlay", "budgets"} | ({"neighbours", "comparison"} if suffix == ".npz" else set())
    assert set(caps["figures"]) == names
    assert ("neighbours" in caps["skipped"]) == (suffix == ".json")
    for n in names:
        with Image.open(out / f"{n}.png") as im:
            assert im.size[0] > 800 and im.info["dpi"][0] == pytest.approx(150, abs=1)
        if suffix == ".json":
            assert (out / f"{n}.svg").stat().st_size > 1000 and (out / f"{n}.pdf").read_bytes()[:4] == b"%PDF"
    assert caps["figures"]["overlay"] == explain.overlay(C.compute_overlay(t, 1))
    assert (out / "attention.html").exists() == (suffix == ".json")
    assert sorted(p.name for p in out.glob("overlay_*_view*.png")) == [f"overlay_{k}_view{v}.png" for k in ("counts", "kept") for v in (0, 1)]


def test_sparse_trace_renders_what_it_can():
    """A trace with no grid geometry, no hidden states and no maps: overlay and neighbours are skipped with a reason."""
    from analysis.figures import render_all
    from tgvkv.layout import TokenLayout

    full = synthetic_trace(layout_two_images(), 2, 0.6, full_maps=False)
    full.layout = TokenLayout.from_spans(full.seq_len, full.layout.image_spans)
    full.hidden_states = {}
    done, skipped = render_all([full], layer=1, backends=())
    assert set(done) == {"attention", "accumulated", "budgets"}
    assert "no image grid geometry" in skipped["overlay"] and "no hidden states" in skipped["neighbours"]
    assert done["attention"]["data"].tokens[0] == "#0"  # no decoded tokens: positions as labels
    with pytest.raises(ValueError, match="out of range"):
        C.compute_attention(full, 5)


def test_box_slightly_outside_the_image_and_missing_image():
    """anyres mosaic boxes may keep a sliver of padding (box outside [0, 1]); views of a video frame have no image."""
    img = Image.new("RGB", (100, 50), (0, 0, 255))
    view = ImageView(0, "tiles", 2, 4, box=(-0.1, 0.0, 1.1, 1.0))
    panel = np.asarray(base_panel(img, view, (100, 50), 200))
    assert panel.shape == (120, 200, 3)  # 100 x 60 px of box, scaled to 200 wide
    assert panel[60, 100, 2] == 255 and panel[1, 100].sum() == 0  # image in the middle, padding sliver black
    d = C.compute_overlay(synthetic_trace(layout_two_images(), 2, 0.6), 0)
    assert len(overlay_panels(d, [img])) == 2  # second image missing: neutral panel, no error


# -- figures say what they show (issue 15) -----------------------------------------------------------------------------
def test_palette_names_every_caption_colour():
    from analysis.legend import accumulated_legend, attention_legend, budgets_legend, neighbours_legend, overlay_legend

    assert palette.name_of(palette.HIGHLIGHT) == "red-orange" and palette.name_of(palette.KEPT) == "green"
    assert palette.name_of(palette.VISION) == "orange" and palette.name_of(palette.TEXT) == "blue"
    assert palette.name_of(palette.HIGHLIGHT.lower()) == "red-orange"
    with pytest.raises(KeyError, match="no caption name"):
        palette.name_of("#123456")
    entries = (overlay_legend("kept", 2, 4, 5) + overlay_legend("kept", 2, 4, 5, has_image=False)
               + overlay_legend("counts", 2, 4, 5) + accumulated_legend() + budgets_legend(15.0, 10)
               + attention_legend() + neighbours_legend())
    for e in entries:  # every entry's words start with the palette's name of the colour it is drawn in
        if e.mark == "scale":
            lo, hi = palette.COLORMAP_ENDS[e.colour]
            assert e.words == f"colour from {lo} to {hi}"
        else:
            assert e.words == f"{palette.COLOUR_NAMES[e.colour]} {e.mark}"
        assert e.sentence() == f"{e.words}: {e.meaning}"
    assert [e.sentence() for e in overlay_legend("kept", 2, 4, 5)] == [
        "green outline: patches kept at layer 2, pixels unchanged",
        "light grey patches: evicted at layer 2, washed out",
        "red-orange boxes: the 5 patches with the highest text→image score"]
    assert overlay_legend("counts", 2, 4, 0)[0].words == "colour from dark purple to yellow"
    with pytest.raises(ValueError, match="legend mark"):
        from analysis.legend import LegendEntry
        LegendEntry("stripes", palette.TEXT, "x")


def test_overlay_pixels_are_the_legend_colours():
    """The outline, boxes and washed-out cells are drawn in exactly the colours the legend names."""
    from analysis.legend import overlay_legend
    from analysis.overlay import draw_highlights

    view = ImageView(0, "image", 4, 4)
    kept = np.zeros((4, 4), bool)
    kept[1:3, 1:3] = True
    img = Image.new("RGB", (400, 400), (120, 60, 200))
    panel = render_kept(base_panel(img, view, img.size, 400), kept)
    panel = draw_highlights(panel, (4, 4), [(3, 3)])
    px = np.asarray(panel)
    outline, evicted, boxes = overlay_legend("kept", 0, 1, 1)
    assert tuple(px[100, 150]) == palette.hex_to_rgb(outline.colour)  # top edge of the kept block (cell row 1 at y=100)
    assert tuple(px[300, 350]) == palette.hex_to_rgb(boxes.colour)  # top edge of the boxed cell (3, 3)
    washed = px[50, 50].astype(int)  # an evicted cell: light grey, as its legend entry says
    assert evicted.words.startswith("light grey") and washed.max() - washed.min() <= 2 and washed.min() > 190
    assert tuple(px[160, 160]) == (120, 60, 200)  # kept pixels unchanged (inside cell (1, 1))
    for dark_or_light in ((0, 0, 0), (255, 255, 255)):  # light grey whatever the image (the demo scenes are black)
        plain = Image.new("RGB", (400, 400), dark_or_light)
        washed = np.asarray(render_kept(base_panel(plain, view, plain.size, 400), kept))[50, 50].astype(int)
        assert washed.max() - washed.min() <= 1 and 180 <= washed.min() <= 225


def test_overlay_legends_in_both_backends(traces):
    from analysis import plots_mpl, plots_plotly
    from analysis.legend import legend_html, overlay_legend

    t = traces["square"]
    d = C.compute_overlay(t, 1)
    img = [Image.new("RGB", (96, 96), (30, 30, 30))]
    entries = overlay_legend("kept", 1, t.num_layers, len(d.top))
    mfig = plots_mpl.plot_overlay(d, img)
    leg = mfig.legends[0]
    assert [tx.get_text() for tx in leg.get_texts()] == [e.meaning for e in entries]
    handle_edges = [matplotlib.colors.to_hex(h.get_edgecolor()).upper() for h in leg.legend_handles]
    assert handle_edges[0] == palette.KEPT and handle_edges[2] == palette.HIGHLIGHT
    pfig = plots_plotly.plot_overlay(d, img)
    legend_text = pfig.layout.annotations[-1].text
    for e in entries + overlay_legend("counts", 1, t.num_layers, 0):
        assert e.sentence() in legend_text
    assert f'<span style="color:{palette.HIGHLIGHT}">■</span> red-orange boxes' in legend_text
    # no image: the legend and the panel titles say so, instead of an unexplained grey grid
    other = synthetic_trace(layout_square(), t.num_layers, t.keep_ratio, seed=1, method="snapkv")
    cmp_legend = plots_mpl.plot_comparison(C.compute_comparison([t, other], 1), img).legends[-1]
    assert [tx.get_text() for tx in cmp_legend.get_texts()] == [e.meaning for e in entries]
    pcmp = plots_plotly.plot_comparison(C.compute_comparison([t, other], 1), img)
    assert pcmp.layout.annotations[-1].text == legend_html(entries)
    bare = plots_mpl.plot_overlay(d, None)
    assert bare.legends[0].get_texts()[0].get_text() == "kept at layer 1 (no image stored)"
    assert all("(no image stored)" in ax.get_title() for ax in bare.axes if ax.get_title())


def test_accumulated_rows_read_from_the_plotted_order(traces):
    from analysis import plots_mpl, plots_plotly

    d = C.compute_accumulated(traces["square"])
    labels = [label for label, _ in d.eviction_rows()]
    assert labels == ["tgv-kv", "attention-only"]
    pfig = plots_plotly.plot_accumulated(d)
    strip = pfig.data[-1]
    assert list(strip.y) == labels and pfig.layout.yaxis2.autorange == "reversed"  # first label drawn on top
    np.testing.assert_array_equal(strip.z[0], d.evicted_method)
    ax_ev = plots_mpl.plot_accumulated(d).axes[1]
    assert [t.get_text() for t in ax_ev.get_yticklabels()] == labels and list(ax_ev.get_yticks()) == [0, 1]
    assert ax_ev.get_ylim()[0] > ax_ev.get_ylim()[1]  # y grows downwards: tick 0 is the top row
    np.testing.assert_array_equal(ax_ev.images[0].get_array()[0], d.evicted_method)
    assert explain.eviction_rows(d) == ("top row: tgv-kv (the traced method); "
                                        "bottom row: attention-only ranking (same per-layer budgets)")
    assert explain.row_position(1, 3) == "row 2 from the top"


def test_log_axes_label_decades(traces):
    from analysis import plots_mpl, plots_plotly

    d = C.compute_accumulated(traces["square"])
    lo, hi = ticks_mod().decade_range(d.accumulated)
    want = [10.0 ** k for k in range(lo, hi + 1)]
    pfig = plots_plotly.plot_accumulated(d)
    assert pfig.layout.yaxis.type == "log" and list(pfig.layout.yaxis.range) == [lo, hi]
    np.testing.assert_allclose(pfig.layout.yaxis.tickvals, want)
    assert list(pfig.layout.yaxis.ticktext) == [ticks_mod().decade_label(k) for k in range(lo, hi + 1)]
    ax = plots_mpl.plot_accumulated(d).axes[0]
    np.testing.assert_allclose(ax.get_yticks(), want)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(pfig.layout.yaxis.ticktext)
    assert not any(t.get_text() for t in ax.yaxis.get_minorticklabels())  # no "2 5" between the decades


def ticks_mod():
    from analysis import ticks

    return ticks


def test_tick_helpers_by_hand():
    T = ticks_mod()
    labels = [T.decade_label(k) for k in (-5, -2, -1, 0, 1, 3, 4)]
    assert labels == ["10⁻⁵", "0.01", "0.1", "1", "10", "1000", "10⁴"]
    assert T.decade_ticks([2.0, 8.0]) == ([1.0, 10.0], ["1", "10"])
    assert T.decade_ticks([0.0, -1.0, np.nan, 0.05, 30.0]) == ([0.01, 0.1, 1.0, 10.0, 100.0],
                                                                ["0.01", "0.1", "1", "10", "100"])
    vals, labels = T.decade_ticks([1e-6, 1e6])  # 13 decades: every 2nd one
    assert labels == ["10⁻⁶", "10⁻⁴", "0.01", "1", "100", "10⁴", "10⁶"]
    assert T.decade_ticks([]) == ([1.0, 10.0], ["1", "10"])
    assert T.integer_ticks(4) == [0, 1, 2, 3]
    assert T.integer_ticks(32) == list(range(0, 32, 2)) and T.integer_ticks(80) == list(range(0, 80, 5))
    assert T.integer_ticks(0) == []
    shown = T.thinned(64, 16, [37])
    assert 37 in shown and len(shown) <= 17 and shown[0] == 0
    assert all(abs(s - 37) >= 2 for s in shown if s != 37)  # nothing crowds the always-shown label
    assert T.thinned(6, 16) == [0, 1, 2, 3, 4, 5]


def test_layer_axes_have_whole_number_ticks(traces):
    from analysis import plots_mpl, plots_plotly

    t = traces["square"]
    other = synthetic_trace(layout_square(), 4, t.keep_ratio, seed=1, method="snapkv")
    cmp = C.compute_comparison([t, other], 1)
    bud = C.compute_budgets([t, other])
    for fig, axis in ((plots_plotly.plot_comparison(cmp, None), "xaxis"), (plots_plotly.plot_budgets(bud), "xaxis")):
        assert list(fig.layout[axis].tickvals) == [0, 1, 2, 3]
        assert list(fig.layout[axis].ticktext) == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(plots_plotly.plot_comparison(cmp, None).data[0].x, [0, 1, 2, 3])
    for fig in (plots_mpl.plot_comparison(cmp, None), plots_mpl.plot_budgets(bud)):
        assert list(fig.axes[0].get_xticks()) == [0, 1, 2, 3]
    big = synthetic_trace(layout_square(6, 2, 6), 24, 0.5, seed=2)
    fig = plots_plotly.plot_budgets(C.compute_budgets([big]))
    assert list(fig.layout.xaxis.tickvals) == list(range(0, 24, 2))
    assert list(plots_mpl.plot_budgets(C.compute_budgets([big])).axes[0].get_xticks()) == list(range(0, 24, 2))


# -- image thumbnails in the trace -------------------------------------------------------------------------------------
def _striped_image(w: int = 96, h: int = 64) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (220, 20, 60)
    a[:, w // 2 :] = (20, 120, 220)
    return Image.fromarray(a)


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_trace_thumbnail_round_trip(tmp_path, suffix):
    from tgvkv.trace import Trace, make_thumbnail

    t = synthetic_trace(layout_two_images(), 2, 0.6)
    t.thumbnails = [make_thumbnail(_striped_image(), 384), make_thumbnail(_striped_image(1000, 500), 384)]
    assert t.thumbnails[0].shape == (64, 96, 3) and t.thumbnails[1].shape == (192, 384, 3)  # bounded, aspect kept
    back = Trace.load(t.save(tmp_path / f"t{suffix}"))
    assert len(back.thumbnails) == 2
    for a, b in zip(t.thumbnails, back.thumbnails):
        np.testing.assert_array_equal(a, b)  # PNG: lossless
    assert [im.size for im in back.images()] == [(96, 64), (384, 192)]


def test_traces_without_thumbnails_still_load(tmp_path):
    """A trace written before thumbnails existed (no 'thumbnails.count' entry) loads with none."""
    from tgvkv.trace import Trace

    t = synthetic_trace(layout_square(), 2, 0.5)
    meta, arrays = t.to_parts()
    assert meta.pop("thumbnails.count") == 0
    path = tmp_path / "old.npz"
    np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **arrays)
    old = Trace.load(path)
    assert old.thumbnails == [] and old.images() == []
    np.testing.assert_array_equal(old.kept_mask, t.kept_mask)


def test_thumbnail_bounds_are_enforced(tmp_path):
    from tgvkv.trace import MAX_THUMBNAIL_SIDE, make_thumbnail

    with pytest.raises(ValueError, match="thumbnail side"):
        make_thumbnail(_striped_image(), 0)
    t = synthetic_trace(layout_square(), 2, 0.5)
    t.thumbnails = [np.zeros((MAX_THUMBNAIL_SIDE + 1, 4, 3), np.uint8)]
    with pytest.raises(ValueError, match="thumbnail must be"):
        t.save(tmp_path / "big.npz")
    t.thumbnails = [np.zeros((8, 8), np.float32)]
    with pytest.raises(ValueError, match="thumbnail must be"):
        t.save(tmp_path / "gray.json")


def test_cli_defaults_to_png_and_svg_and_draws_the_stored_image(tmp_path):
    from analysis.figures import main
    from tgvkv.trace import make_thumbnail

    t = synthetic_trace(layout_square(), 3, 0.5)
    t.thumbnails = [make_thumbnail(_striped_image(96, 96), 384)]
    out = tmp_path / "figs"
    assert main(["--trace", str(t.save(tmp_path / "a.npz")), "--out", str(out), "--layer", "1"]) == 0
    names = set(json.loads((out / "captions.json").read_text())["figures"])
    assert names == {"neighbours", "attention", "accumulated", "overlay", "budgets"}
    for n in names:
        assert (out / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", n
        assert b"<svg" in (out / f"{n}.svg").read_bytes()[:2000], n
    assert not list(out.glob("*.pdf"))
    kept = t.kept_mask[1][t.layout.token_map.positions].reshape(12, 12)
    with Image.open(out / "overlay_kept_view0.png") as im:
        px = np.asarray(im.convert("RGB"), dtype=int)
    cell = px.shape[1] // 12
    r, c = np.argwhere(kept)[0]
    centre = px[r * cell + cell // 2, c * cell + cell // 2]
    want = (220, 20, 60) if c < 6 else (20, 120, 220)
    assert np.abs(centre - want).max() <= 3  # the stored image's pixels under a kept patch


def test_cli_without_any_image_says_so(tmp_path, caplog, capsys):
    from analysis.figures import main

    t = synthetic_trace(layout_square(), 3, 0.5)
    out = tmp_path / "figs"
    with caplog.at_level("WARNING"):
        assert main(["--trace", str(t.save(tmp_path / "a.npz")), "--out", str(out), "--formats", "png"]) == 0
    assert "stores no image and no --image was given" in caplog.text
    with Image.open(out / "overlay_kept_view0.png") as im:
        px = np.asarray(im.convert("RGB"))
    band = px[-6:, px.shape[1] // 2 - 60 : px.shape[1] // 2 + 60]  # the "no image stored" banner at the bottom
    assert (band == 0).all(axis=2).any() and (band == 255).all(axis=2).any()
    assert main(["--trace", str(tmp_path / "a.npz"), "--out", str(out), "--formats", "png,jpgx"]) == 2  # refused
    assert "--formats: unknown format 'jpgx'" in capsys.readouterr().err


def test_reference_lines_are_drawn_in_their_named_colour(traces):
    """plotly's simple_white template draws shapes at opacity 0.3 (black would show as grey): lines set opacity 1."""
    from analysis import plots_plotly

    t = traces["square"]
    budgets = plots_plotly.plot_budgets(C.compute_budgets([t]))
    for fig in (plots_plotly.plot_attention(C.compute_attention(t, 1)), budgets):
        assert fig.layout.shapes and all(s.opacity == 1 for s in fig.layout.shapes)
    assert [s.line.color for s in budgets.layout.shapes] == [palette.BOUNDARY, palette.TEXT]
