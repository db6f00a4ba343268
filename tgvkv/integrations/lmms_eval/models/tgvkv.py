"""The lmms-eval model ``tgvkv``: any supported VLM, answering through the TGV-KV engine under any policy.

    LMMS_EVAL_PLUGINS=tgvkv.integrations.lmms_eval python -m lmms_eval --model tgvkv \\
        --model_args pretrained=<hub id or folder>,method=tgv-kv,keep=0.05,protocol=official --tasks ...

Data parallel: ``accelerate launch --num_processes N -m lmms_eval ...`` (one model per process, on
``cuda:<local rank>``; lmms-eval shards the documents by rank). ``device_map=auto`` spreads one model over the
GPUs of a single process instead; the two do not combine. The request plumbing is in `..adapter`.
"""
from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from loguru import logger as eval_logger
from tqdm import tqdm

from ..adapter import EngineRunner, PluginConfig, RequestRef, TraceStore


@register_model("tgvkv")
class TGVKV(lmms):
    """``--model_args`` are the fields of `PluginConfig` (pretrained, method, keep, protocol, dtype, device,
    device_map, max_new_tokens, max_frames, seed, policy_options, trace_dir, trace_images, trace_diagnostics,
    trust_remote_code)."""

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        import torch
        from accelerate import Accelerator

        from .... import hf_compat
        from ....loading import LoadOptions, load_model

        self.tgvkv_config = cfg = PluginConfig.from_model_args(model_args)
        self.accelerator = Accelerator()
        rank, world, local_rank = _process_group(self.accelerator)
        device = cfg.device
        if world > 1:
            if cfg.device_map:
                raise ValueError("device_map spreads one model over all GPUs of one process; it cannot be combined "
                                 "with data parallelism (accelerate launch with several processes)")
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
            self._rank, self._world_size = rank, world
        model, processor = load_model(cfg.pretrained, LoadOptions(device=device, dtype=cfg.dtype,
                                                                  device_map=cfg.device_map,
                                                                  trust_remote_code=cfg.trust_remote_code))
        self._model, self.processor = model, processor
        self._device = hf_compat.language_device(model)
        traces = TraceStore(cfg.trace_dir, self._rank, cfg.trace_images) if cfg.trace_dir else None
        self.runner = EngineRunner(model, processor, cfg, model_name=cfg.pretrained, traces=traces)
        eval_logger.info(f"tgvkv: {cfg.pretrained} on {self._device}, method={cfg.method} keep={cfg.keep_ratio} "
                         f"protocol={cfg.protocol}, process {self._rank} of {self._world_size}")

    # -- what the evaluator reads ------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    def clean(self) -> None:
        """lmms-eval frees the model after the requests (before LLM-judge metrics): drop our reference too."""
        self.runner = None
        super().clean()

    # -- requests ------------------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        return self.task_dict[task][split][doc_id]

    def _answer(self, context: str, gen_kwargs: dict, visuals: Any, ref: RequestRef) -> GenerationResult:
        ans = self.runner.answer(context, visuals, gen_kwargs, ref)
        ignored = self.runner.warn_ignored(ans.ignored_settings)
        if ignored:
            eval_logger.warning(f"tgvkv: generation setting(s) {ignored} of task {ref.task!r} do not apply to the "
                                "engine and are ignored")
        return GenerationResult(text=ans.text, token_counts=TokenCounts(input_tokens=ans.prompt_tokens,
                                                                        output_tokens=ans.new_tokens))

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="tgvkv generate_until"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(self._doc(task, split, doc_id))
            res = self._answer(context, gen_kwargs, visuals, RequestRef(task, split, doc_id))
            out.append(res)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), res.text)
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each round is its own prompt (the task's ``doc_to_text`` builds it from the previous answers, with
        the round's visuals), answered by a fresh engine call, as lmms-eval's reference models do."""
        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="tgvkv generate_until_multi_round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            visuals, answers, info, round_idx = doc_to_visual(doc), [], None, 0
            while True:
                answers.append(self._answer(context, dict(gen_kwargs), visuals,
                                            RequestRef(task, split, doc_id, round_idx)).text)
                round_idx += 1
                visuals, context, terminal, _, info = doc_to_text(doc, previous_output=list(answers),
                                                                  round_idx=round_idx, previous_round_info=info)
                if terminal:
                    break
            out.append(answers)
            self.cache_hook.add_partial("generate_until_multi_round", (req.args[0], gen_kwargs), answers)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="tgvkv loglikelihood"):
            if len(req.args) != 6:  # ("", choice): the unconditional terms of acc_mutual_info
                raise ValueError(f"task {req.task_name!r}: loglikelihood requests without a document (the "
                                 "acc_mutual_info metric's unconditional terms) are not supported: the engine "
                                 "evicts by the image prompt")
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            if not isinstance(continuation, str):  # tasks may pass doc_to_target itself
                continuation = continuation(doc)
            out.append(self.runner.loglikelihood(context, continuation, doc_to_visual(doc),
                                                 RequestRef(task, split, doc_id)))
        return out


def _process_group(accelerator) -> tuple[int, int, int]:
    """(rank, world size, local rank). With GPUs accelerate knows them; `accelerate launch --multi_gpu` on a
    machine without GPUs starts a gloo group that the Accelerator reports as one process (lmms-eval then takes
    its torchrun path), so the process group is asked first."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", accelerator.local_process_index))
        return dist.get_rank(), dist.get_world_size(), local
    return accelerator.process_index, accelerator.num_processes, accelerator.local_process_index
