"""Train and evaluate every method of a study, each in its own run directory,
within a wall-clock budget, resumable at any point.

Layout of the study directory ``OUT``:

* ``study.json`` — the :class:`~advtrain.study.spec.StudySpec`;
* ``<method>/`` — the method's run directory (``checkpoint.pt``,
  ``metrics.jsonl``: one record per epoch with the PGD-20 accuracy on the
  study's fixed test images) and, once its final evaluation is done,
  ``result.json``. A method with a ``result.json`` is finished and never
  rerun; one with only a checkpoint resumes from it.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..training.atomic import atomic_write_text
from ..training.callbacks import Callback
from .plan import Estimator, planned_order
from .spec import SPEC_NAME, STRENGTH_METHODS, StudySpec, method_title, read_spec

RESULT_NAME = "result.json"
FINAL_ATTACKS = ("PGD-20", "CW-20", "APGD-CE", "APGD-T")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class BudgetStop(Callback):
    """Ends a method's training after the epoch whose successor (and the
    final evaluation) would not finish before ``deadline`` (a
    ``time.monotonic()`` value). Its checkpoint is written as usual, so the
    next study run continues the method from there."""

    def __init__(self, deadline: Optional[float], estimate_epoch: Callable[[], Optional[float]],
                 estimate_eval: Callable[[], Optional[float]], clock: Callable[[], float]) -> None:
        self.deadline, self.clock = deadline, clock
        self.estimate_epoch, self.estimate_eval = estimate_epoch, estimate_eval
        self.stopped = False

    @property
    def name(self) -> str:
        return "advtrain.study.budget"

    def on_epoch_end(self, trainer: Any, epoch: int, record: Dict[str, Any]) -> None:
        if self.deadline is None or trainer.epoch + 1 >= trainer.epochs:
            return
        # the trainer's own epochs so far are the best guess of its next one
        own = record.get("time", 0.0) + record.get("eval_time", 0.0)
        nxt = max(own, self.estimate_epoch() or 0.0)
        final = self.estimate_eval() or 0.0
        if self.clock() + nxt + final > self.deadline:
            self.stopped = True
            trainer.stop_training = True


def _checkpoint_epoch(run_dir: Path) -> int:
    """Epochs a method's checkpoint holds (0 without one)."""
    metrics = run_dir / "metrics.jsonl"
    if not (run_dir / "checkpoint.pt").is_file() or not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if line.strip())


def _epoch_records(run_dir: Path) -> List[Dict[str, Any]]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


class Study:
    """A study in directory ``out``: :meth:`run` trains and evaluates what is
    left of ``spec`` within ``budget`` seconds (``None``: no limit).

    ``train`` and ``test``: the datasets (``ArrayDataset``), already the full
    splits; the spec's sizes take the first images of each. ``order``: see
    :data:`~advtrain.study.plan.ORDERS`. ``device``: where to train
    (default: CUDA when available). ``progress``: the trainers' live bars.
    ``log``: where the study's own lines go (default: ``print``).
    """

    def __init__(self, spec: StudySpec, out: Path, train: Any, test: Any, *, budget: Optional[float] = None,
                 order: str = "cost", device: Optional[str] = None, progress: bool = True,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec, self.out = spec, Path(out)
        self.train = train if spec.train_examples is None else train.subset(min(spec.train_examples, len(train)))
        self.test = test.subset(min(spec.eval_examples, len(test)))
        self.num_classes = len(train.classes)
        self.order = planned_order(spec.methods, order)
        self.budget, self.device, self.progress, self.log, self.clock = budget, device, progress, log, clock

    # ------------------------------------------------------------- bookkeeping
    def claim(self) -> None:
        """Write ``study.json`` for a new study, or check that the study
        already in ``out`` has the same spec (``ValueError`` naming the
        differences otherwise)."""
        found = read_spec(self.out)
        if found is None:
            if self.out.is_dir() and any(self.out.iterdir()):
                raise ValueError(f"{self.out} is not empty and holds no {SPEC_NAME}: pass another --out")
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / SPEC_NAME, json.dumps(self.spec.to_dict(), indent=2) + "\n",
                              what="study record")
            return
        changed = found.differences(self.spec)
        if changed:
            raise ValueError(f"{self.out} holds a study with other settings ({'; '.join(changed)}): run it with "
                             "the same settings to continue it, or pass another --out")

    def result(self, name: str) -> Optional[Dict[str, Any]]:
        path = self.out / name / RESULT_NAME
        return json.loads(path.read_text()) if path.is_file() else None

    def estimator(self) -> Estimator:
        epoch_times = {n: [r["time"] for r in _epoch_records(self.out / n) if "time" in r] for n in self.spec.methods}
        evals = [r["eval_seconds"] for r in (self.result(n) for n in self.spec.methods) if r]
        return Estimator.from_measurements(len(self.train), len(self.test), epoch_times, evals)

    # ----------------------------------------------------------------- running
    def run(self) -> List[str]:
        """Train and evaluate the methods left, in the planned order; returns
        the methods finished when it returns. A method that does not fit the
        budget is left for a later run (with its checkpoint, if it started)."""
        self.claim()
        start = self.clock()
        deadline = None if self.budget is None else start + self.budget
        for i, name in enumerate(self.order, start=1):
            if self.result(name) is not None:
                self.log(f"[{i}/{len(self.order)}] {name}: finished in an earlier run")
                continue
            estimator = self.estimator()
            trainer = self._trainer(name, deadline, estimator)
            done = _checkpoint_epoch(self.out / name)
            left = max(trainer.epochs - done, 0)
            predicted = estimator.method_seconds(name, left)
            remaining = None if deadline is None else deadline - self.clock()
            if remaining is not None and predicted is not None and predicted > remaining:
                self.log(f"[{i}/{len(self.order)}] {name}: skipped, it needs about {_clock(predicted)} and "
                         f"{_clock(remaining)} of the budget is left; run the study again to continue it")
                continue
            if remaining is not None and remaining <= 0:
                self.log(f"[{i}/{len(self.order)}] {name}: skipped, the budget is spent")
                continue
            self.log(f"[{i}/{len(self.order)}] {name}: {trainer.epochs} epochs"
                     + (f" ({done} done)" if done else "")
                     + (f", about {_clock(predicted)} left for it" if predicted is not None else "")
                     + (f"; {_clock(remaining)} of the budget left" if remaining is not None else ""))
            trainer.fit(self.train, eval_data=self.test, resume=done > 0)
            budget_stop = next(cb for cb in trainer.callbacks if isinstance(cb, BudgetStop))
            if trainer.epoch < trainer.epochs:
                if budget_stop.stopped:
                    self.log(f"[{i}/{len(self.order)}] {name}: stopped after epoch {trainer.epoch} of "
                             f"{trainer.epochs} to stay within the budget; {trainer.checkpoint_note()}")
                continue
            if deadline is not None and (self.estimator().final_eval() or 0.0) > deadline - self.clock():
                self.log(f"[{i}/{len(self.order)}] {name}: trained; its final evaluation is left for the next run")
                continue
            self._final_evaluation(name, trainer)
        return [n for n in self.order if self.result(n) is not None]

    def _trainer(self, name: str, deadline: Optional[float], estimator: Estimator) -> Any:
        from ..methods import get_method
        from ..models import build_model
        from ..methods.protocols import build_protocol_trainer

        spec, method = self.spec, get_method(name)
        torch.manual_seed(spec.seed)  # every method starts from the same weights
        model = build_model(spec.model, num_classes=self.num_classes, **dict(spec.model_kwargs))
        kwargs: Dict[str, Any] = dict(batch_size=spec.batch_size, seed=spec.seed, run_dir=self.out / name,
                                      eval_every=1, eval_examples=len(self.test), device=self.device,
                                      progress=self.progress)
        if spec.epochs is not None:
            kwargs["epochs"] = spec.epochs
        if "eps" in method.options:
            kwargs["eps"] = spec.eps
        kwargs.update(spec.method_options.get(name, {}))
        if spec.protocol is None:
            trainer = method.build(model, **kwargs)
        else:
            trainer = build_protocol_trainer(spec.protocol, name, model, **kwargs)
        trainer.callbacks = list(trainer.callbacks)
        trainer.callbacks.append(BudgetStop(deadline, lambda: estimator.epoch_seconds(name), estimator.final_eval,
                                            self.clock))
        if spec.strength and name in STRENGTH_METHODS:
            from ..diagnostics import PerturbationRecorder  # diagnostics record, the study runs them

            probe = self.test.subset(min(spec.strength_examples, len(self.test)))
            trainer.callbacks.append(PerturbationRecorder(probe.images, probe.labels, seed=spec.seed))
        return trainer

    def _final_evaluation(self, name: str, trainer: Any) -> Dict[str, Any]:
        """Evaluate the finished model (and its weight average) on the fixed
        test images; write ``result.json``."""
        from ..evaluation import attack_suite, evaluate
        from ..training import evaluation_weights, load_checkpoint

        start = time.perf_counter()
        state = load_checkpoint(self.out / name / "checkpoint.pt")
        variants = {"raw": evaluation_weights(state, "raw")[0]}
        if state.get("weight_average") is not None:
            variants["averaged"] = evaluation_weights(state, "averaged")[0]
        eps = self.spec.eps
        evaluations: Dict[str, Any] = {}
        for which, weights in variants.items():
            model = copy.deepcopy(trainer.model)
            model.load_state_dict(weights)
            torch.manual_seed(self.spec.seed)
            common = dict(eps=eps, device=trainer.device, autocast_dtype=trainer.autocast_dtype,
                          progress=self.progress)
            first = evaluate(model, self.test, {**attack_suite("pgd20", eps), **attack_suite("cw", eps)},
                             sequential=False, masking_checks=False, **common)
            aa = evaluate(model, self.test, "autoattack", **common)
            worst = first.robust_correct & aa.robust_correct
            evaluations[which] = {
                "clean": first.clean_accuracy, "pgd20": first.per_attack["PGD-20"], "cw": first.per_attack["CW-20"],
                "autoattack": aa.robust_accuracy, "aa_grade": float(worst.float().mean()),
                "masking_findings": [f.check for f in aa.masking_findings],
            }
        records = _epoch_records(self.out / name)
        times = [r["time"] for r in records if "time" in r]
        result = {"method": name, "title": method_title(name), "epochs": len(records), "planned_epochs": trainer.epochs,
                  "train_seconds": sum(times), "epoch_seconds": times, "eval_seconds": time.perf_counter() - start,
                  "eval_examples": len(self.test), "raw": evaluations["raw"],
                  "averaged": evaluations.get("averaged")}
        atomic_write_text(self.out / name / RESULT_NAME, json.dumps(result, indent=2) + "\n", what="study result")
        raw = evaluations["raw"]
        self.log(f"    {name}: clean {raw['clean']:.3f}, PGD-20 {raw['pgd20']:.3f}, CW {raw['cw']:.3f}, "
                 f"AA-grade {raw['aa_grade']:.3f} on {len(self.test)} test images "
                 f"(evaluated in {_clock(result['eval_seconds'])})")
        return result


__all__ = ["BudgetStop", "FINAL_ATTACKS", "RESULT_NAME", "Study"]
