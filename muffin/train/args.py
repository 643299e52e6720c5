"""``DPOConfig``: the DPO trainer's configuration, a ``transformers.TrainingArguments`` with the RLAIF-V fields.

Every field carries ``metadata={"help": ...}`` so that ``HfArgumentParser`` (``train_dpo.py``) documents it, and
``__post_init__`` rejects inconsistent settings with a message that names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from muffin.train.loss import LOSS_TYPES


@dataclass
class DPOConfig(TrainingArguments):
    """TrainingArguments plus model, data, reference-cache, loss and LoRA settings (paper defaults where it has one).

    Example:
        >>> cfg = DPOConfig(output_dir="runs/x", model_path="ckpt/llava-1.5-7b", data="data/RLAIF-V-Dataset",
        ...                 use_lora=True)  # doctest: +SKIP
    """

    # ---- model
    model_path: str | None = field(
        default=None,
        metadata={
            "help": "Local checkpoint directory (with config.json) of the initial policy; also the reference model."
        },
    )
    family: str | None = field(
        default=None,
        metadata={"help": "Force a model family (muffin.known_families()); by default read from config.json."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the Python code shipped with the checkpoint (MiniCPM-Llama3-V 2.5's own modeling code) "
            "instead of this project's implementation; off by default: read that code before turning this on."
        },
    )
    model_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype the weights are loaded in: auto, bf16, fp16 or "
            "fp32. auto = bf16 under DeepSpeed with --bf16 (DeepSpeed keeps fp32 master weights), "
            "else fp32 (the Trainer's --bf16 then autocasts)."
        },
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Shared-prefix fast path: encode each pair's image and prompt once, both answers attend to it "
            "(same numbers as two sequences; off automatically under plain DDP and ZeRO-3)."
        },
    )
    compile_layers: str = field(
        default="auto",
        metadata={
            "help": "Run the packed decoder layers compiled: auto (on a GPU for a wide LM, when the run has enough "
            "steps to repay the compilation, docs/PERFORMANCE.md), true, false. The reference stage takes the same.",
            "choices": ["auto", "true", "false", "True", "False"],
        },
    )
    checkpoint_layers: int = field(
        default=-1,
        metadata={
            "help": "With --gradient_checkpointing: how many decoder layers, from the first, are checkpointed; the "
            "others keep their activations and skip the recomputation: a little faster for more GPU memory per layer "
            "(docs/PERFORMANCE.md). -1 = all (the paper's setting). Families that list their decoder layers (LLaVA)."
        },
    )
    freeze_vision: bool = field(
        default=True, metadata={"help": "Freeze the family's frozen_modules() (the vision tower), as the paper does."}
    )
    # ---- data
    data: str | None = field(
        default=None,
        metadata={
            "help": "Preference pairs: a directory of RLAIF-V-Dataset "
            "parquet files, one parquet file, a pair JSONL file from the feedback pipeline, or a hub "
            "dataset id (e.g. openbmb/RLAIF-V-Dataset)."
        },
    )
    data_split: str = field(default="train", metadata={"help": "Split to load for a hub dataset id."})
    image_root: str | None = field(
        default=None,
        metadata={"help": "Directory relative image paths are resolved against (default: the data file's directory)."},
    )
    model_max_length: int = field(
        default=2048,
        metadata={
            "help": "Longest prompt + answer in tokens; longer pairs "
            "keep the whole prompt (image tokens included) and lose the answer's tail."
        },
    )
    # ---- reference log-probs
    logps_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the reference log-probs cache lives (a "
            "parquet `logps` column + fingerprint.json); default next to the data: "
            "<data>.logps/. Computed with the initial model when missing."
        },
    )
    reference_batch_size: int = field(
        default=8, metadata={"help": "Pairs per batch when computing reference log-probs."}
    )
    # ---- loss
    beta: float = field(default=0.1, metadata={"help": "DPO beta (inverse temperature of the implicit reward)."})
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": f"One of {', '.join(LOSS_TYPES)}: DPO, conservative (label-smoothed) DPO, IPO, hinge (SLiC)."
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label smoothing eps of the conservative loss, in [0, 0.5)."}
    )
    use_average: bool = field(
        default=False,
        metadata={"help": "Use the answer's mean token log-prob instead of the sum (policy and reference alike)."},
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the SFT term -log p(chosen) added to the "
            "preference loss (same reduction as the DPO term)."
        },
    )
    ddpo_gamma: float = field(
        default=1.0,
        metadata={
            "help": "RLHF-V DDPO token weight on the tokens where chosen "
            "and rejected differ (RLHF-V uses 5); 1 disables token weighting."
        },
    )
    # ---- LoRA
    use_lora: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters on the LM's linear layers and the "
            "family's trainable_modules() (the projector) fully; else full fine-tuning."
        },
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    # ---- TrainingArguments defaults that differ for this trainer
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the pair collator needs every field of a record."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "transformers' filter that leaves NaN/inf step losses out of the logged loss; it reads the loss "
            "on the host after every step, which makes the host wait for the GPU each step. Off: a NaN loss shows "
            "in the log as NaN."
        },
    )
    logging_steps: float = field(default=1, metadata={"help": "Log loss, rewards and log-probs every N steps."})
    # ---- reruns
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start over in --output_dir: delete its checkpoint-* folders and fingerprint instead of resuming. "
            "Without it a rerun resumes from the newest complete checkpoint and refuses one made with another model, "
            "data or training setting (docs/RESUMING.md)."
        },
    )

    def __post_init__(self) -> None:
        checks = [
            (self.beta > 0, f"beta must be > 0, got {self.beta}; the paper uses 0.1"),
            (
                self.loss_type in LOSS_TYPES,
                f"unknown loss_type '{self.loss_type}'. Available: {', '.join(LOSS_TYPES)}",
            ),
            (0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (
                self.label_smoothing == 0 or self.loss_type == "conservative",
                f"label_smoothing={self.label_smoothing} only applies to --loss_type conservative; set one or the other",
            ),
            (self.sft_weight >= 0, f"sft_weight must be >= 0, got {self.sft_weight}"),
            (self.ddpo_gamma > 0, f"ddpo_gamma must be > 0 (1 disables DDPO weighting), got {self.ddpo_gamma}"),
            (self.model_max_length > 0, f"model_max_length must be > 0, got {self.model_max_length}"),
            (self.reference_batch_size > 0, f"reference_batch_size must be > 0, got {self.reference_batch_size}"),
            (
                self.lora_r > 0 and self.lora_alpha > 0,
                f"lora_r and lora_alpha must be > 0, got {self.lora_r}, {self.lora_alpha}",
            ),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (
                self.checkpoint_layers >= -1,
                f"checkpoint_layers must be -1 (all) or a number of layers >= 0, got {self.checkpoint_layers}",
            ),
            (
                str(self.compile_layers).lower() in ("auto", "true", "false"),
                f"compile_layers must be auto, true or false, got '{self.compile_layers}'",
            ),
            (
                self.model_dtype in ("auto", "bf16", "fp16", "fp32"),
                f"model_dtype must be auto, bf16, fp16 or fp32, got '{self.model_dtype}'",
            ),
            (
                not self.remove_unused_columns,
                "remove_unused_columns must be False for DPO training (the collator "
                "reads image, question, chosen and rejected); drop the flag",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        # non-reentrant checkpointing needs no input that requires grad (LoRA freezes the embeddings); transformers
        # 5.24 renamed the field to activation_checkpointing_kwargs (and defaults to non-reentrant), 5.17 has not
        name = (
            "activation_checkpointing_kwargs"
            if hasattr(self, "activation_checkpointing_kwargs")
            else "gradient_checkpointing_kwargs"
        )
        if getattr(self, name) is None and getattr(self, "gradient_checkpointing_kwargs", None) is None:
            setattr(self, name, {"use_reentrant": False})
        super().__post_init__()

    def __getstate__(self) -> dict:
        """Pickled (``training_args.bin`` in every checkpoint) without credentials: ``--hub_token`` and any other
        field named like a secret is None in the copy; the running process keeps its value for pushing."""
        from utils.secrets import is_secret_key

        state = dict(self.__dict__)
        for key in state:
            if is_secret_key(key):
                state[key] = None
        return state

    def require_paths(self) -> None:
        """Raise unless ``model_path`` and ``data`` are set (they are optional only so the dataclass can default)."""
        if not self.model_path:
            raise ValueError("model_path is required: pass --model_path <checkpoint directory>")
        if not self.data:
            raise ValueError("data is required: pass --data <parquet dir | pair JSONL | hub dataset id>")
