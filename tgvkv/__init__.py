"""TGV-KV Explorer: text-grounded KV-cache eviction for vision-language models, inspectable end to end."""
from .layout import TokenLayout
from .policies import POLICIES, Policy, Selection, make_policy
from .select import layer_budgets, run_selection, select

__all__ = ["select", "layer_budgets", "run_selection", "POLICIES", "Policy", "Selection", "make_policy", "TokenLayout"]

__version__ = "0.1.0"

from .images import load_image_file as load_image  # noqa: E402
from .generation import CaptureOptions, Comparison, Result, RunOptions, compare, generate  # noqa: E402
from .loading import LoadOptions, load_demo_model, load_model  # noqa: E402
from .trace import Trace  # noqa: E402

__all__ += ["generate", "compare", "Result", "Comparison", "RunOptions", "CaptureOptions", "Trace", "load_model",
            "load_demo_model", "LoadOptions", "load_image"]
