"""One validated configuration for the whole pipeline.

Notebook parameters, the ``medcap`` CLI and :mod:`medcap_helpers.pipeline` all build a
:class:`MedcapConfig`; every value is checked on construction and a bad one raises
:class:`ConfigError` with a message that names the field and what would be accepted.

Two profiles ship: ``smoke`` (a tiny BLIP, the embedded sample, CPU, minutes) and
``full`` (BLIP-large, the full IU X-Ray collection, a CUDA GPU).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap_helpers.errors import ConfigError

BLIP_LARGE_ID = "Salesforce/blip-image-captioning-large"
TINY_MODEL = "tiny"
"""Sentinel model name: a tiny randomly initialised BLIP built locally (no download)."""
RANDOM_BLIP_LARGE = "random-blip-large"
"""Sentinel model name: BLIP-large's architecture with random weights, built locally (the rehearsal:
true memory, speed and size with no download; its reports mean nothing)."""
LOCAL_MODELS = (TINY_MODEL, RANDOM_BLIP_LARGE)
REHEARSAL_DATA = "data/rehearsal"
"""Where ``python -m medcap_helpers.rehearsal`` writes the rehearsal's Open-i-layout data."""

PROFILES = ("smoke", "full", "rehearsal")
STAGES: tuple[str, ...] = ("01_data", "02_baseline", "03_qlora_train", "04_sweep", "05_merge_requant",
                           "06_eval_and_demo")
"""The pipeline's stages, in order: each is a notebook ``notebooks/<stage>.ipynb`` and a metrics file."""
DATA_SOURCES = ("smoke", "openi", "r2gen", "mimic_r2gen", "kaggle", "xrv_reports", "hub")
TARGETS = ("findings", "impression", "both")
SPLIT_MODES = ("random", "r2gen")
EXAMPLE_UNITS = ("image", "study")
VIEWS = ("single", "both")
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
TEXT_LORA_TARGETS = ("query", "key", "value", "dense")
VISION_LORA_TARGETS = ("qkv", "projection", "fc1", "fc2")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts")
BEST_MODEL_METRICS = ("CIDEr", "CE micro-F1")
"""Validation metrics of generated reports that can choose the epoch training keeps."""
SWEEP_STRATEGIES = ("halving", "grid")


@dataclass
class MedcapConfig:
    """Every knob of the pipeline. Build with :meth:`from_profile` to start from a profile."""

    profile: str = "smoke"
    run_dir: str = "runs/smoke"
    seed: int = 42
    device: str = "auto"
    cpu_threads: int | None = None
    """torch's intra-op CPU threads; None keeps torch's default (one per core). The smoke profile uses 1:
    the tiny model's ops are too small to gain from more, and with more threads than idle cores (another
    process busy) every op waits for a descheduled thread, which made a 30 s stage take 2-9x longer."""

    # --- data -------------------------------------------------------------------------
    data_source: str = "smoke"
    data_path: str | None = None
    """Reports folder/.tgz (openi), annotation.json (r2gen, mimic_r2gen), CSV folder (kaggle)."""
    images_dir: str | None = None
    hub_dataset_id: str | None = None
    target: str = "findings"
    lowercase: bool = False
    example_unit: str = "image"
    """Training examples with ``views="single"``: every image ("image") or one per study ("study").
    Validation and test always hold one row per study: every score is per study."""
    views: str = "single"
    """"single": a study is read through one image (the frontal where the source says which);
    "both": its first two views together as one input (see :mod:`medcap_helpers.multiview`)."""
    split_mode: str = "random"
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    smoke_num_reports: int = 64
    smoke_image_size: int = 256
    max_image_pixels: int = 50_000_000
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    # --- model ------------------------------------------------------------------------
    model_name: str = TINY_MODEL
    load_in_4bit: bool = True
    compute_dtype: str = "auto"
    max_target_tokens: int = 128
    tiny_init_range: float = 0.1
    """Init scale of the tiny random BLIP: larger than BLIP's 0.02 so adapters can learn."""
    tiny_pretrain_epochs: int = 0
    """Epochs of text-only pretraining of the tiny model's text decoder before it is saved (0: none; the
    smoke profile uses 3), on the tokenizer's corpus: the bundled IU X-Ray reports minus this dataset's
    validation and test reports (:func:`~medcap_helpers.pretrain.pretrain_text_decoder`). BLIP-large's decoder
    comes pretrained; a random one cannot learn to write reports in a few CPU minutes."""
    tiny_pretrain_learning_rate: float = 1e-2
    """AdamW learning rate of that pretraining (linear decay to 0; every decoder weight trains)."""
    tiny_pretrain_memory_share: float = 0.3
    """Share of a report's words the pretraining puts, as noisy embeddings, in the decoder's
    cross-attention memory (where fine-tuning puts the image): the decoder learns to read that memory,
    and to write the rest of the report from what it has learned of the language. 0 leaves the memory out."""

    # --- LoRA -------------------------------------------------------------------------
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("query", "value", "dense")
    lora_vision: bool = False

    # --- training ---------------------------------------------------------------------
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    num_train_epochs: float = 5.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    group_by_length: bool = False
    """Batch training studies of similar report length (HF's ``LengthGroupedSampler``: random groups of
    ``50 x`` the effective batch, sorted by length): batches pad less, so each step processes fewer tokens.
    The order of training changes, not what is trained on."""
    cache_vision_embeddings: bool = False
    """Compute the frozen vision tower's tokens of each image once and train on them from disk
    (:mod:`medcap_helpers.vision_cache`; about 1.2 MB per image at BLIP-large size). Not used with
    ``lora_vision``, whose tower changes as it trains. On in the smoke and full profiles: the same
    metrics (smoke: 03 in 45 s instead of 55 s; rehearsal on two H200s: the same validation loss, 119
    samples/s against 50 from pixels in an earlier session)."""
    vision_cache_dir: str | None = None
    """Where that cache lives (None: ``<run_dir>/vision_cache``); a shared folder serves several runs of the
    same model and processor."""
    optim: str = "adamw_torch"
    logging_steps: int = 5
    profile_dir: str | None = None
    """A diagnostic: when set, stage 03 records optimizer steps 4-7 with ``torch.profiler`` and writes, per
    process, the operators by GPU and CPU time, the steps' wall and GPU-busy time, and a trace into this
    folder (:class:`medcap_helpers.train.TorchProfilerCallback`). It slows those steps."""
    vram_budget_gb: float | None = None
    num_gpus: int | None = None
    """GPUs stage 03 trains on, one data-parallel process each (:mod:`medcap_helpers.distributed`);
    None: every visible GPU. Ignored on the CPU."""
    best_model_metric: str = "CIDEr"
    """The validation score of generated reports that picks the epoch training keeps: "CIDEr" (published
    practice), or "CE micro-F1" (do the reports name the right findings?). The smoke profile uses CE:
    on its 30 validation studies CIDEr can prefer an early epoch that writes the normal template."""

    # --- generation / evaluation ---------------------------------------------------------
    max_new_tokens: int = 100
    min_new_tokens: int | None = None
    """Force every generated report to at least this many tokens. Only the rehearsal sets it: a random
    model stops after a word or two, which would make generation look fast."""
    num_beams: int = 3
    compile_generation: bool = False
    """On a GPU, decode from a static key/value cache with the decoder's step compiled by ``torch.compile``
    (inductor, static shapes). Compiled once per process; later calls refill the compiled copy with
    their model's weights. A compiler that fails falls back to plain generation with a warning. Off: on an
    H100 (rehearsal, 4 GB cap, batches of 37 studies) it compiled in 21 s once per process, then wrote 33.0
    reports/s on the 296-study validation split against 23.4 without it, and as many as the default path on
    64-study calls, so a whole run gains about what the compile costs; and with random weights the
    rehearsal cannot show that real reports stay the same (``benchmarks/decoding.py``). Ignored on the CPU."""
    graph_generation: bool = True
    """On a GPU, run the 16-bit decoder copy's decoding step on fixed buffers and replay it as one CUDA graph
    (:class:`medcap_helpers.decoding_graph.StaticDecodingStep`): one launch per step instead of about 415;
    transformers still does the beam search, and no compiler is involved. Recorded once per generation call
    and batch size. On the rehearsal (H100, 4 GB cap, beam 3, 75 tokens, batches of 37 studies) 91.0
    reports/s on the 296-study validation split against 32.9 without it in the same call, fed the same
    tokens its logits within 0.044 of transformers' forward (fp16; the same top token wherever the top two
    differ by more than 0.1); ``benchmarks/decoding.py --backends graph``. A step that cannot be recorded
    falls back to plain generation with a warning. Ignored on the CPU."""
    compile_training: bool = False
    """On one GPU, compile stage 03's training step (forward and backward) with ``torch.compile`` in
    inductor's "reduce-overhead" mode: its kernels are recorded once as CUDA graphs and replayed, instead of
    launched one by one by Python, on batches padded to one shape (micro-batch x ``max_target_tokens``, two
    views; the same loss: :func:`medcap_helpers.processing.pad_to_static_shape`). Use it with
    ``dequantize_frozen_weights`` (bitsandbytes' 4-bit matmuls would stay opaque calls between graphs). On
    the rehearsal (H100, 4 GB allocator cap, 16 x 1 with checkpointing, the whole training set) the Trainer
    trained at 324 samples/s against 108.5 eagerly after a 60 s compile in its first step (344 and 368
    against 107.5 and 110.2 over two epochs at another seed), validation losses within 0.3% of the eager
    ones (its dropout draws other random numbers: another draw of the same training). **On in the full
    profile**: per process (NVML, sampled every 0.1 s) the compiled run peaked at 3.70 GB against 3.52-3.77
    eagerly, within a 4 GB card; inductor's compile workers hold no GPU memory (the same peak with
    ``TORCHINDUCTOR_COMPILE_THREADS=1``). An earlier reading of 4.73 GB was the whole device's use, which
    counted the benchmark's parent process (0.97 GB) and 0.5 GB that NVML lists under no process. The first
    step compiles (60-85 s). A compiler that fails on the first step (no Triton or C compiler) leaves
    training eager, with a warning. Sweep trials train eagerly (each would compile again), and so do several
    data-parallel processes. Ignored on the CPU."""
    sdpa_attention: bool = False
    """Train with the text decoder's attention computed by PyTorch's fused ``scaled_dot_product_attention``
    (:mod:`medcap_helpers.attention`): the same attention in one kernel, without keeping its probabilities for
    the backward pass. Generation is unchanged. On in the full profile: measured on the rehearsal (H200, 4 GB
    cap, 16 x 1, cached tokens, one call; with the fused AdamW, which alone changed nothing measurable) 65.7
    samples/s against 61.8 after the first step, with the same logged losses to three decimals and the same
    validation loss (8.4410 against 8.4409)."""
    dequantize_frozen_weights: bool = False
    """Train with the text decoder's frozen 4-bit weights dequantized once and kept in 16 bits while it
    trains, instead of dequantized at every matmul (:mod:`medcap_helpers.frozen_weights`): the same weights
    and arithmetic, fewer kernel launches, for 0.24 GB at BLIP-large size. The 4-bit weights stay the
    model's; generation releases the copy. Ignored for a model that is not quantized. On in the full
    profile: a training step of 16 x 1 with checkpointing ran at 83.5 samples/s against 52.0 (H100, 4 GB
    cap, paired in one process: ``benchmarks/training_step.py``), with the same loss curve in 03."""
    eval_batch_size: int = 8
    """Studies per generation batch (at most: with ``vram_budget_gb`` the batch is fitted to the budget).
    The validation loss runs at ``per_device_train_batch_size``."""
    bootstrap_samples: int = 1000

    # --- sweep ------------------------------------------------------------------------
    sweep_ranks: tuple[int, ...] = (4, 8, 16, 32)
    sweep_alphas: tuple[int, ...] = (16, 32, 64)
    sweep_strategy: str = "halving"
    """"halving": successive halving within ``sweep_budget_share`` of one training run; "grid": every
    setting for ``sweep_epochs`` epochs (see :mod:`medcap_helpers.sweep`)."""
    sweep_budget_share: float = 1.0
    """Training examples of all halving trials together, as a share of one full training run."""
    sweep_eval_examples: int | None = None
    """Validation studies each trial generates and scores (None: all of them)."""
    sweep_epochs: float = 1.0
    sweep_vram_budget_gb: float = 4.0

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded with the run (never read by the pipeline)."""

    def __post_init__(self) -> None:
        for name in ("split_ratios", "lora_target_modules", "sweep_ranks", "sweep_alphas"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self.validate()

    # ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first invalid value."""
        for name in BOOLEAN_FIELDS:  # a string such as "false" would otherwise switch a setting on
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        _choice("profile", self.profile, PROFILES)
        _choice("device", self.device, DEVICES)
        _choice("data_source", self.data_source, DATA_SOURCES)
        _choice("target", self.target, TARGETS)
        _choice("split_mode", self.split_mode, SPLIT_MODES)
        _choice("example_unit", self.example_unit, EXAMPLE_UNITS)
        _choice("views", self.views, VIEWS)
        _choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _choice("best_model_metric", self.best_model_metric, BEST_MODEL_METRICS)
        if not str(self.run_dir).strip():
            raise ConfigError("run_dir is empty: give a folder for the run's outputs, e.g. 'runs/smoke'.")
        if self.data_source in ("openi", "r2gen", "mimic_r2gen", "kaggle") and not self.data_path:
            raise ConfigError(
                f"data_source={self.data_source!r} needs data_path (the reports folder or .tgz for "
                "'openi', annotation.json for 'r2gen' and 'mimic_r2gen', the folder with indiana_reports.csv "
                "for 'kaggle')."
            )
        if self.data_source == "hub" and not self.hub_dataset_id:
            raise ConfigError("data_source='hub' needs hub_dataset_id, e.g. 'org/iu_xray'.")
        if self.split_mode == "r2gen" and self.data_source in ("hub", "xrv_reports"):
            raise ConfigError(f"split_mode='r2gen' assigns IU X-Ray studies by their Open-i study id; "
                              f"data_source={self.data_source!r} has no such ids: use 'openi', 'kaggle', "
                              "'r2gen' or 'smoke'.")
        if len(self.split_ratios) != 3 or any(r < 0 for r in self.split_ratios):
            raise ConfigError(f"split_ratios must be three non-negative numbers (train, val, test), "
                              f"got {self.split_ratios!r}.")
        if abs(sum(self.split_ratios) - 1.0) > 1e-6 or self.split_ratios[0] <= 0:
            raise ConfigError(f"split_ratios must sum to 1 with a non-zero train share, "
                              f"got {self.split_ratios!r}.")
        _positive_int("seed", self.seed, allow_zero=True)
        if self.cpu_threads is not None:
            _positive_int("cpu_threads", self.cpu_threads)
        _positive_int("smoke_num_reports", self.smoke_num_reports, minimum=6)
        _positive_int("smoke_image_size", self.smoke_image_size, minimum=32)
        _positive_int("max_image_pixels", self.max_image_pixels)
        for name in ("max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not str(self.model_name).strip():
            raise ConfigError(f"model_name is empty: use {BLIP_LARGE_ID!r}, a local folder, or {TINY_MODEL!r}.")
        _positive_int("max_target_tokens", self.max_target_tokens, minimum=8)
        if not self.tiny_init_range > 0:
            raise ConfigError(f"tiny_init_range must be > 0, got {self.tiny_init_range!r}.")
        _positive_int("tiny_pretrain_epochs", self.tiny_pretrain_epochs, allow_zero=True)
        if not (isinstance(self.tiny_pretrain_learning_rate, (int, float)) and 0 < self.tiny_pretrain_learning_rate < 1):
            raise ConfigError(f"tiny_pretrain_learning_rate must be a number in (0, 1), got "
                              f"{self.tiny_pretrain_learning_rate!r}.")
        if not (isinstance(self.tiny_pretrain_memory_share, (int, float)) and 0 <= self.tiny_pretrain_memory_share <= 1):
            raise ConfigError(f"tiny_pretrain_memory_share must be a share in [0, 1], got "
                              f"{self.tiny_pretrain_memory_share!r}.")

        _positive_int("lora_r", self.lora_r)
        _positive_int("lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty: LoRA needs at least one layer name, "
                              f"e.g. {TEXT_LORA_TARGETS[0]!r}.")
        known = TEXT_LORA_TARGETS + VISION_LORA_TARGETS
        unknown = [m for m in self.lora_target_modules if m not in known]
        if unknown:
            raise ConfigError(f"Unknown LoRA target module(s) {unknown}: BLIP's text decoder has "
                              f"{list(TEXT_LORA_TARGETS)}, its vision tower {list(VISION_LORA_TARGETS)} "
                              "(set lora_vision=True to adapt the vision tower).")

        _positive_int("per_device_train_batch_size", self.per_device_train_batch_size)
        _positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise ConfigError(f"learning_rate must be a number in (0, 1), got {self.learning_rate!r} "
                              "(QLoRA usually uses 1e-4 to 3e-4).")
        if not self.num_train_epochs > 0:
            raise ConfigError(f"num_train_epochs must be > 0, got {self.num_train_epochs!r}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        _positive_int("logging_steps", self.logging_steps)
        if self.vram_budget_gb is not None and not self.vram_budget_gb > 0:
            raise ConfigError(f"vram_budget_gb must be a positive number of GB or None, got {self.vram_budget_gb!r}.")
        if self.num_gpus is not None:
            _positive_int("num_gpus", self.num_gpus)
            if self.num_gpus > 1 and self.device == "cpu":
                raise ConfigError(f"num_gpus={self.num_gpus} asks for GPUs but device='cpu': use device='cuda' "
                                  "(or 'auto'), or leave num_gpus unset.")

        _positive_int("max_new_tokens", self.max_new_tokens)
        if self.min_new_tokens is not None:
            _positive_int("min_new_tokens", self.min_new_tokens)
            if self.min_new_tokens > self.max_new_tokens:
                raise ConfigError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}.")
        _positive_int("num_beams", self.num_beams)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("bootstrap_samples", self.bootstrap_samples, minimum=10)

        if not self.sweep_ranks or not self.sweep_alphas:
            raise ConfigError("sweep_ranks and sweep_alphas need at least one value each.")
        for r in self.sweep_ranks:
            _positive_int("sweep_ranks entry", r)
        for a in self.sweep_alphas:
            _positive_int("sweep_alphas entry", a)
        _choice("sweep_strategy", self.sweep_strategy, SWEEP_STRATEGIES)
        if not (isinstance(self.sweep_budget_share, (int, float)) and self.sweep_budget_share > 0):
            raise ConfigError(f"sweep_budget_share must be a positive share of one training run, got "
                              f"{self.sweep_budget_share!r}.")
        if self.sweep_eval_examples is not None:
            _positive_int("sweep_eval_examples", self.sweep_eval_examples)
        if not self.sweep_epochs > 0:
            raise ConfigError(f"sweep_epochs must be > 0, got {self.sweep_epochs!r}.")
        if not self.sweep_vram_budget_gb > 0:
            raise ConfigError(f"sweep_vram_budget_gb must be > 0, got {self.sweep_vram_budget_gb!r}.")

    # ---------------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, profile: str = "smoke", **overrides: Any) -> MedcapConfig:
        """The named profile's defaults with ``overrides`` applied (unknown keys are an error)."""
        _choice("profile", profile, PROFILES)
        values: dict[str, Any] = dict(PROFILE_DEFAULTS[profile])
        values["profile"] = profile
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise ConfigError(f"Unknown setting(s) {unknown}. Known settings: {', '.join(field_names())}.")
        values.update({k: v for k, v in overrides.items() if v is not None or k in _NULLABLE})
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MedcapConfig:
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise ConfigError(f"Unknown setting(s) {unknown} in saved config.")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> MedcapConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> MedcapConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def is_smoke(self) -> bool:
        return self.data_source == "smoke"

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


_NULLABLE = {"data_path", "images_dir", "hub_dataset_id", "max_train_examples", "max_eval_examples",
             "vram_budget_gb", "cpu_threads", "min_new_tokens", "num_gpus", "vision_cache_dir",
             "sweep_eval_examples", "profile_dir"}

PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The smoke run must show learning on its placeholder images in a few CPU minutes (issue 12): 300
    # reports (60 test studies, so CE micro-F1 is not decided by a handful), the tiny decoder pretrained
    # on training-side report text first (tiny_pretrain_epochs), 20 epochs of LoRA r=16 in batches of 8,
    # and the epoch kept by validation CE micro-F1: on 30 validation studies CIDEr can prefer an early
    # epoch that writes the normal template.
    "smoke": dict(
        run_dir="runs/smoke", data_source="smoke", model_name=TINY_MODEL, device="cpu", cpu_threads=1,
        smoke_num_reports=300, tiny_pretrain_epochs=3, num_train_epochs=20.0, per_device_train_batch_size=8,
        best_model_metric="CE micro-F1", gradient_accumulation_steps=1, learning_rate=5e-3,
        max_target_tokens=64, max_new_tokens=40, num_beams=1, logging_steps=5, bootstrap_samples=200,
        lora_r=16, lora_alpha=64, sweep_ranks=(4, 16), sweep_alphas=(16, 64), sweep_budget_share=0.6,
        lora_dropout=0.0, cache_vision_embeddings=True,
    ),
    "full": dict(
        run_dir="runs/full", data_source="openi", data_path="data/NLMCXR_reports.tgz",
        images_dir="data/NLMCXR_png", split_mode="r2gen", views="both", model_name=BLIP_LARGE_ID, device="cuda",
        # Batches of 16 studies (the seed's 1 x 4 with 2e-4 is `--set per_device_train_batch_size=1 --set
        # gradient_accumulation_steps=4 --set learning_rate=2e-4 --set vram_budget_gb=None`); the learning
        # rate grows with the square root of the batch (Adam). vram_budget_gb fits micro-batch and
        # checkpointing to a 4 GB card, keeping the batch of 16 (README, "Under a 4 GB cap"), and sizes the
        # generation batches (at most eval_batch_size) to the same budget.
        num_train_epochs=5.0, per_device_train_batch_size=16, gradient_accumulation_steps=1,
        learning_rate=4e-4, max_target_tokens=128, max_new_tokens=100, num_beams=3, eval_batch_size=64,
        vram_budget_gb=4.0, sweep_eval_examples=64, group_by_length=True,
        # Measured on the rehearsal (H200, 4 GB cap, 2 GPUs at 16 x 1): the same validation loss as from the
        # images (8.1145 both); 119 samples/s against 50 from pixels in an earlier session (multi_gpu.json).
        cache_vision_embeddings=True, sdpa_attention=True,
        # The frozen decoder weights dequantized once while training (README, "Training levers").
        # The training step replayed as CUDA graphs: 3-4x faster, 3.70 GB per process (docstring).
        dequantize_frozen_weights=True, compile_training=True,
    ),
}
# The rehearsal: the full profile at real scale with nothing downloaded. BLIP-large's architecture with
# random weights, the 3,955 real report XMLs and one placeholder radiograph per image id (Open-i's size),
# written once by `python -m medcap_helpers.rehearsal`. Reports are forced to 75 new tokens: the real
# findings' 95th percentile is 57 words (bundled reports), about 75 word-piece tokens with punctuation.
PROFILE_DEFAULTS["rehearsal"] = {
    **PROFILE_DEFAULTS["full"], "run_dir": "runs/rehearsal", "model_name": RANDOM_BLIP_LARGE,
    "data_path": f"{REHEARSAL_DATA}/NLMCXR_reports.tgz", "images_dir": f"{REHEARSAL_DATA}/NLMCXR_png",
    "max_new_tokens": 75, "min_new_tokens": 75,
}


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(MedcapConfig)]


BOOLEAN_FIELDS = tuple(f.name for f in dataclasses.fields(MedcapConfig) if f.type in ("bool", bool))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def _positive_int(name: str, value: Any, minimum: int = 1, allow_zero: bool = False) -> None:
    lowest = 0 if allow_zero else minimum
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ConfigError(f"{name} must be a whole number >= {lowest}, got {value!r}.")
