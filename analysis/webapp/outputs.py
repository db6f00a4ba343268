"""Named outputs: what each UI handler returns is a record with one field per page component it updates, and one
binding per record maps the fields to the components of the page.

The binding is the single place where a field meets its component: the event's output list and the values handed
to Gradio are both read from it, in the record's field order, so adding, removing or reordering an output cannot
shift the others, and a field without a component (or a component without a field) fails when the page is built.
The field order is also the order of a named API endpoint's outputs (what gradio_client returns): keep it stable.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Generic, Self, Sequence, TypeVar

import gradio as gr


class Outputs:
    """Base of the output records (frozen dataclasses)."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def skipped(cls) -> Self:
        """Every output left as it is on the page."""
        return cls(**{name: gr.skip() for name in cls.names()})

    def values(self) -> list[Any]:
        return [getattr(self, name) for name in self.names()]


@dataclass(frozen=True, kw_only=True)
class RunOutputs(Outputs):
    """A comparison (`/compare`): the session's run state, both answers, the per-step KL figure, metrics and JSON."""

    run_state: Any  # state.RunState, or None after a failure
    full_answer: str
    evicted_answer: str
    kl_plot: Any
    kl_caption: str
    metrics: str
    summary: dict | None


@dataclass(frozen=True, kw_only=True)
class DiagnosticsOutputs(Outputs):
    """Every diagnostic tab of a run (`/diagnostics`): the three layer sliders, then each view and its caption."""

    overlay_layer: Any  # slider updates (range of the run's model), or gr.skip()
    attention_layer: Any
    compare_layer: Any
    overlay_image: Any
    overlay_caption: str
    budgets_plot: Any
    budgets_caption: str
    attention_plot: Any
    attention_caption: str
    neighbours_plot: Any
    neighbours_caption: str
    accumulated_plot: Any
    accumulated_caption: str
    explain_intro: str
    explain_tvb_figure: Any
    explain_tvb: str
    explain_twr_figure: Any
    explain_twr: str
    explain_tpr_image: Any
    explain_tpr: str


@dataclass(frozen=True, kw_only=True)
class ExportOutputs(Outputs):
    """An export (`/export`, `/export_lesson`): the files to download and a line saying what they are."""

    files: list[str] | None
    summary: str


@dataclass(frozen=True, kw_only=True)
class FigureOutputs(Outputs):
    """One view of a run (`/overlay`, `/attention`): its figure (or image) and caption."""

    figure: Any
    caption: str


@dataclass(frozen=True, kw_only=True)
class MethodsOutputs(Outputs):
    """Two methods compared (`/compare_methods`): overlays + Jaccard figure, budgets figure, table."""

    comparison_plot: Any
    budgets_plot: Any
    table: str


@dataclass(frozen=True, kw_only=True)
class LessonOutputs(Outputs):
    """A built lesson (`/lesson`): the session's lesson state and the slides."""

    lesson_state: Any  # lesson.LessonState
    deck: str


R = TypeVar("R", bound=Outputs)


class Binding(Generic[R]):
    """The page components of one output record, field by field."""

    def __init__(self, record: type[R], **components: Any) -> None:
        names = record.names()
        missing, extra = sorted(set(names) - set(components)), sorted(set(components) - set(names))
        if missing or extra:
            raise ValueError(f"{record.__name__}: no component for {missing}, no field for {extra}")
        self.record = record
        self.components = [components[name] for name in names]

    def values(self, outputs: R) -> list[Any]:
        if not isinstance(outputs, self.record):
            raise TypeError(f"expected {self.record.__name__}, got {type(outputs).__name__}")
        return outputs.values()


def wired(handler: Callable[..., Any], *bindings: Binding) -> tuple[Callable[..., Any], list[Any]]:
    """(fn, outputs) for a Gradio event: `handler` returns one record per binding (a tuple when several); `fn`
    hands Gradio their values in the order of `outputs`, both read from the bindings."""

    @functools.wraps(handler)  # Gradio reads the signature (inputs, progress) and the docstring through it
    def fn(*args: Any, **kwargs: Any) -> Any:
        result = handler(*args, **kwargs)
        records: Sequence[Outputs] = result if len(bindings) > 1 else (result,)
        if len(records) != len(bindings):
            raise TypeError(f"{handler.__name__} returned {len(records)} records for {len(bindings)} bindings")
        values = [value for binding, record in zip(bindings, records) for value in binding.values(record)]
        return values if len(values) != 1 else values[0]  # Gradio takes a lone output's value bare

    outputs = [component for binding in bindings for component in binding.components]
    return fn, outputs


__all__ = ["Outputs", "RunOutputs", "DiagnosticsOutputs", "ExportOutputs", "FigureOutputs", "MethodsOutputs",
           "LessonOutputs", "Binding", "wired"]
