"""The lesson over the API (gradio_client): `/lesson` builds this session's lesson, `/export_lesson` writes it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from test_app_api import client, url  # noqa: F401  (module-scoped fixtures: the real app, one client session)
from analysis.webapp import lesson as LW
from analysis.webapp import models as M
from analysis.webapp.lesson_examples import load_lesson_examples


def test_lesson_and_export_lesson_endpoints(client):  # noqa: F811
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in info["/lesson"]["parameters"]] == [
        "image", "question", "followup", "model_name", "keep_percent", "max_new_tokens"]
    assert info["/export_lesson"]["parameters"] == []
    with pytest.raises(AppError, match="build the lesson first, then export it"):
        client.predict(api_name="/export_lesson")

    ex = next(e for e in load_lesson_examples() if e.kind == "followup-lost")
    deck = client.predict(handle_file(str(ex.path)), ex.question, ex.followup, "demo", ex.keep_percent, 32,
                          api_name="/lesson")
    ref = LW.build(Image.open(ex.path), ex.question, ex.followup, M.DEMO, ex.keep_percent, 32)
    assert re.findall(r'data-key="([a-z-]+)"', deck) == [s.key for s in ref.steps]
    assert ref.meta["official_answer"] in deck.replace("&#x27;", "'")
    files, note = client.predict(api_name="/export_lesson")
    # by suffix: each file comes back in a folder named by its content hash, so full paths sort either way
    paths = sorted((Path(f if isinstance(f, str) else f["path"]) for f in files), key=lambda p: p.suffix)
    assert [p.suffix for p in paths] == [".html", ".pdf"] and paths[0].name.startswith("lesson-" + "-".join(ex.question.split()[:4]))
    page = paths[0].read_text()
    for s in ref.steps:
        assert s.title in page
    assert paths[1].read_bytes().startswith(b"%PDF") and "opens offline" in note
