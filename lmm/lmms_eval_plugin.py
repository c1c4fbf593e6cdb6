"""The project's models as an lmms-eval model: ``lmms-eval --model emergent_grounding --model_args run=runs/NAME``.

lmms-eval (``pip install -e '.[eval]'``) finds this class through the ``lmms_eval.models`` entry point
(``lmm.lmms_eval_manifest``). ``model_args`` name one model, as ``lmm.model_source`` loads it:

- ``run=runs/NAME``: a trained run of this project;
- ``llava15=WEIGHTS,clip=CLIP``: a released LLaVA-1.5 checkpoint (original layout) and its CLIP tower;
- ``difflmm=WEIGHTS,base=VICUNA,sd=SD15,clip=CLIP[,noise=stochastic|fixed]``: the released DiffLMM.

and optionally ``device`` (default: this process's GPU, else the CPU), ``dtype`` (``auto``: float16 on GPU,
float32 on CPU), ``batch_size``, ``max_new_tokens`` (used when a task sets none; default 1024 as lmms-eval's
LLaVA models), ``template`` / ``aspect`` (override what the model was instruction-tuned with) and
``score_stop`` (count the end-of-turn token in log-likelihoods, as LLaVA's own lmms-eval model does) and
``multi_image`` (below).

Requests are answered by ``lmm.chat_runner.ChatRunner``: batched, left-padded generation with the model's
chat template, greedy unless the task asks for sampling, cut at the task's ``until`` strings, at most the
task's ``max_new_tokens``; ``loglikelihood`` sums the continuation's token log-probabilities.
``generate_until_multi_round`` follows lmms-eval's multi-round protocol (the task's ``doc_to_text`` is called
after every round with the previous outputs until it signals the end). Data parallel: under ``accelerate
launch`` or ``torchrun`` every process loads the model onto its own GPU and lmms-eval hands it its shard of
the documents (the evaluator shards by ``RANK``/``WORLD_SIZE``); results are gathered by lmms-eval.
LLaVA-1.5 takes one image per prompt: a document with several (SEED-Bench's video questions carry frames) is
an error naming it unless ``multi_image=middle`` (the middle one, as LLaVA-1.5's SEED-Bench evaluation takes
a video's middle frame) or ``multi_image=first``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from lmm.chat_runner import SAMPLING_KEYS, ChatRunner
from lmm.model_source import load_model_source

log = logging.getLogger(__name__)

MODEL_NAME = "emergent_grounding"
#: Generation settings of lmms-eval tasks that the model ignores (they configure other models).
IGNORED_GENERATION_KEYS = ("image_aspect_ratio", "use_cache", "stop", "max_length")
#: What to do with a document that has several images (the model takes one).
MULTI_IMAGE = ("error", "middle", "first")


def default_device() -> str:
    """This process's GPU (``LOCAL_RANK`` under torchrun/accelerate), else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


class EmergentGrounding(lmms):
    """lmms-eval model over ``ChatRunner``; see the module docstring for ``model_args``."""

    is_simple = True

    def __init__(
        self,
        run: str | None = None,
        llava15: str | None = None,
        difflmm: str | None = None,
        clip: str | None = None,
        base: str | None = None,
        sd: str | None = None,
        noise: str = "stochastic",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it; automatic batch sizes are not supported
        max_new_tokens: int = 1024,
        template: str | None = None,
        aspect: str | None = None,
        score_stop: bool = False,
        multi_image: str = "error",
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        if str(batch_size).startswith("auto"):
            raise ValueError(
                f"batch_size={batch_size!r}: automatic batch sizes are not supported; give a number"
            )
        self.batch_size_per_device = int(batch_size)
        if self.batch_size_per_device < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.score_stop = bool(score_stop)
        if multi_image not in MULTI_IMAGE:
            raise ValueError(f"multi_image={multi_image!r} is not one of {MULTI_IMAGE}")
        self.multi_image = multi_image
        # Under accelerate launch / torchrun this joins the process group; alone it is one CPU/GPU process.
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            self._device = self.accelerator.device
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        else:
            self._device = torch.device(device or default_device())
        loaded = load_model_source(
            run=run,
            llava15=llava15,
            difflmm=difflmm,
            clip=clip,
            base=base,
            sd=sd,
            noise=noise,
            device=self._device,
            dtype=dtype,
        )
        self.description = loaded.description
        self.runner = ChatRunner(
            loaded.model, template or loaded.template, aspect or loaded.aspect, reference=loaded.reference
        )
        log.info(
            "%s on %s (rank %d of %d): template %s, aspect %s",
            loaded.description,
            self._device,
            self._rank,
            self._world_size,
            self.runner.template.name,
            self.runner.aspect,
        )

    # ----------------------------------------------------------------------------- lmms-eval's API
    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def tokenizer(self) -> Any:
        return self.runner.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    def clean(self) -> None:
        # lmms-eval frees models it finds as attributes; the model lives inside the runner.
        self.runner = None
        super().clean()

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; see ``ChatRunner.generate``."""
        args = [request.args for request in requests]

        def by_length(arg: tuple) -> tuple[int, str]:
            # Longest prompts first, as lmms-eval's own models batch (similar lengths pad little).
            return -len(self.runner.tokenizer(arg[0])["input_ids"]), arg[0]

        order = lmms_utils.Collator(args, by_length, grouping=True)
        answers: list[str] = []
        progress = tqdm(total=len(args), disable=self.rank != 0, desc="emergent_grounding generate")
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            contexts, settings, doc_to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
            images = [
                self._one_image(fn(self.task_dict[task][split][doc_id]), task, doc_id)
                for fn, task, split, doc_id in zip(doc_to_visual, tasks, splits, doc_ids, strict=True)
            ]
            until, max_new_tokens, sampling = self._generation_settings(settings[0])
            answers.extend(
                self.runner.generate(contexts, images, until=until, max_new_tokens=max_new_tokens, **sampling)
            )
            progress.update(len(chunk))
        progress.close()
        return order.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, is it the greedy continuation), in request order."""
        out: list[tuple[float, bool]] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="emergent_grounding loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            chunk = [request.args for request in requests[start : start + self.batch_size]]
            contexts, continuations, images = [], [], []
            for context, target, doc_to_visual, doc_id, task, split in chunk:
                doc = self.task_dict[task][split][doc_id]
                contexts.append(context)
                continuations.append(target if isinstance(target, str) else target(doc))
                images.append(self._one_image(doc_to_visual(doc), task, doc_id))
            out.extend(self.runner.loglikelihood(contexts, continuations, images, self.score_stop))
            progress.update(len(chunk))
        progress.close()
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """lmms-eval's multi-round protocol: after each round the task's ``doc_to_text(doc, previous_output=,
        round_idx=, previous_round_info=)`` returns (visuals, next context, done, round results, info)."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="emergent_grounding multi-round"):
            context, settings, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            until, max_new_tokens, sampling = self._generation_settings(settings)
            visuals: Any = doc_to_visual(doc)
            outputs: list[str] = []
            info = None
            round_idx = 0
            while True:
                image = self._one_image(visuals, task, doc_id)
                answer = self.runner.generate(
                    [context], [image], until=until, max_new_tokens=max_new_tokens, **sampling
                )[0]
                outputs.append(answer)
                round_idx += 1
                visuals, context, done, round_results, info = doc_to_text(
                    doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                )
                if round_results is not None:
                    outputs = list(round_results)
                if done:
                    break
            results.append(outputs)
        return results

    # ------------------------------------------------------------------------------------- helpers
    def _generation_settings(self, settings: dict | None) -> tuple[list[str], int, dict[str, Any]]:
        """(until strings, max new tokens, sampling settings) from a task's generation kwargs (a copy)."""
        settings = dict(settings or {})
        until = settings.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"generation kwarg 'until' must be a string or a list of strings, got {until!r}")
        max_new_tokens = int(settings.pop("max_new_tokens", None) or self.max_new_tokens)
        for key in IGNORED_GENERATION_KEYS:
            settings.pop(key, None)
        unknown = set(settings) - set(SAMPLING_KEYS)
        if unknown:
            log.warning("ignoring generation settings %s (not supported by %s)", sorted(unknown), MODEL_NAME)
        sampling = {k: v for k, v in settings.items() if k in SAMPLING_KEYS and v is not None}
        return list(until), max_new_tokens, sampling

    def _one_image(self, visuals: Any, task: str, doc_id: int) -> Image.Image | None:
        """The document's image (None for a text-only document); several: see ``multi_image``."""
        if visuals is None:
            return None
        items = list(visuals) if isinstance(visuals, Sequence) and not isinstance(visuals, str) else [visuals]
        items = [v for v in items if v is not None]
        if not items:
            return None
        if len(items) > 1 and self.multi_image == "error":
            raise ValueError(
                f"{task} doc {doc_id} has {len(items)} images; {MODEL_NAME} models take one (LLaVA-1.5 format): "
                "pass multi_image=middle or multi_image=first in --model_args"
            )
        image = items[len(items) // 2] if self.multi_image == "middle" else items[0]
        if isinstance(image, (str, Path)) and Path(image).is_file():
            image = Image.open(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"{task} doc {doc_id}: expected a PIL image, got {type(image).__name__}")
        return image
