"""train: LoRA fine-tune of a causal LM on prepared conversations (the seed's configs/lora.yaml keys).

Labels: the templated prompt up to and including the assistant marker is -100; the reply and the
final EOS are learned. Truncation is counted and reported, never silent.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lawchat_server.prompt import encode_training_example


class FinetuneError(Exception):
    """Bad config or data: reported to the user with exit code 2."""


@dataclass
class DataConfig:
    train_file: str = "train.jsonl"
    val_file: str | None = "dev.jsonl"
    test_file: str | None = "test.jsonl"
    num_proc: int | None = None     # kept for the seed's config; tokenization here is in-process


@dataclass
class FinetuneConfig:
    data_config: DataConfig = field(default_factory=DataConfig)
    max_input_length: int = 256
    max_output_length: int = 512
    training_args: dict = field(default_factory=dict)
    peft_config: dict = field(default_factory=dict)
    batching: str = "grouped"    # lawchat's addition (trainer/collate.py): grouped | packed | padded
    liger_kernel: bool | str = False   # lawchat's addition (trainer/kernels.py): true | false | auto (on with CUDA
                                       # and the liger-kernel package)
    attention: str = "sdpa"      # lawchat's addition (trainer/attention.py): sdpa | varlen
    quantization: dict = field(default_factory=dict)   # lawchat's addition: QLoRA — the base loaded quantised by
                                                       # bitsandbytes (transformers' BitsAndBytesConfig keys)
    labelled_logits: bool = True   # lawchat's addition (trainer/train_log.py): the LM head and loss only where a
                                   # label is (same loss; GLM/Llama/Qwen2/Mistral, without liger-kernel, which fuses it)


BATCHING = ("grouped", "packed", "padded")
ATTENTION = ("sdpa", "varlen")


# LoRA targets when peft_config leaves target_modules unset and PEFT has no default for the model type.
# glm: a ChatGLM3 checkpoint converted to transformers' GlmForCausalLM (PEFT's own list knows only "chatglm").
DEFAULT_TARGET_MODULES = {"glm": ["q_proj", "k_proj", "v_proj"]}


def load_config(path: str | Path) -> FinetuneConfig:
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"no such config: {path}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    known = {"data_config", "max_input_length", "max_output_length", "training_args", "peft_config", "batching",
             "liger_kernel", "attention", "quantization", "labelled_logits"}
    unknown = set(raw) - known
    if unknown:
        raise FinetuneError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(known)}")
    data = raw.get("data_config") or {}
    try:
        data_config = DataConfig(**data)
    except TypeError as e:
        raise FinetuneError(f"{path}: data_config: {e}") from None
    cfg = FinetuneConfig(data_config=data_config,
                         max_input_length=int(raw.get("max_input_length", 256)),
                         max_output_length=int(raw.get("max_output_length", 512)),
                         training_args=dict(raw.get("training_args") or {}),
                         peft_config=dict(raw.get("peft_config") or {}),
                         batching=raw.get("batching", FinetuneConfig.batching),
                         liger_kernel=raw.get("liger_kernel", FinetuneConfig.liger_kernel),
                         attention=raw.get("attention", FinetuneConfig.attention),
                         quantization=dict(raw.get("quantization") or {}),
                         labelled_logits=raw.get("labelled_logits", FinetuneConfig.labelled_logits))
    if not isinstance(cfg.labelled_logits, bool):
        raise FinetuneError(f"{path}: labelled_logits must be true or false, got {cfg.labelled_logits!r}")
    if cfg.liger_kernel not in (True, False, "auto"):
        raise FinetuneError(f"{path}: liger_kernel must be true, false or auto, got {cfg.liger_kernel!r}")
    if cfg.attention not in ATTENTION:
        raise FinetuneError(f"{path}: attention must be one of {list(ATTENTION)}, got {cfg.attention!r}")
    if cfg.batching not in BATCHING:
        raise FinetuneError(f"{path}: batching must be one of {list(BATCHING)}, got {cfg.batching!r}")
    q = cfg.quantization
    if q and not (q.get("load_in_4bit") or q.get("load_in_8bit")):
        raise FinetuneError(f"{path}: quantization needs load_in_4bit: true (QLoRA) or load_in_8bit: true, got {q}")
    if cfg.peft_config.get("peft_type", "LORA") != "LORA":
        raise FinetuneError(f"{path}: only peft_type LORA is supported, got {cfg.peft_config['peft_type']}")
    return cfg


def load_conversations(path: Path) -> list[list[dict]]:
    """Each JSONL line is {"conversations": [{role, content}, ...]} ending with an assistant turn."""
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conv = json.loads(line)["conversations"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FinetuneError(f"{path}:{lineno}: not a conversation line ({e})") from None
            if not conv or conv[-1].get("role") != "assistant":
                raise FinetuneError(f"{path}:{lineno}: the last turn must be the assistant's")
            out.append(conv)
    return out


def encode_split(tokenizer, convs: list[list[dict]], cfg: FinetuneConfig, name: str, report: dict) -> list[dict]:
    rows, n_prompt, n_reply = [], 0, 0
    for conv in convs:
        row, p, r = encode_training_example(tokenizer, conv, cfg.max_input_length, cfg.max_output_length)
        rows.append(row)
        n_prompt += p
        n_reply += r
    report[name] = {"examples": len(rows), "prompt_truncated": n_prompt, "reply_truncated": n_reply}
    if n_prompt or n_reply:
        print(f"train: {name}: {n_prompt} prompt(s) longer than max_input_length={cfg.max_input_length} kept their "
              f"last tokens; {n_reply} repl(y/ies) cut at max_output_length={cfg.max_output_length}", file=sys.stderr)
    return rows


QUANT_FILE = "lawchat_quantization.json"   # beside a QLoRA adapter: the base's quantisation (lawchat merge reads it)


def quantization_config(q: dict):
    """The config's `quantization` -> transformers' BitsAndBytesConfig; FinetuneError where bitsandbytes cannot run."""
    import importlib.util

    import torch
    if not torch.cuda.is_available():
        raise FinetuneError("quantization (QLoRA) needs a CUDA card: bitsandbytes' 4-bit training kernels run on GPUs; "
                            "on this machine use configs/lora.yaml")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FinetuneError("quantization (QLoRA) needs bitsandbytes: pip install 'lawchat[qlora]'")
    from transformers import BitsAndBytesConfig
    q = dict(q)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(q.get(key), str):
            q[key] = getattr(torch, q[key])
    return BitsAndBytesConfig(**q)


def length_grouping_args() -> dict:
    """TrainingArguments for length-grouped batches (the key was renamed within transformers 5.x)."""
    from dataclasses import fields

    from transformers import TrainingArguments
    names = {f.name for f in fields(TrainingArguments)}
    return {"group_by_length": True} if "group_by_length" in names else {"train_sampling_strategy": "group_by_length"}


def finetune(data_dir: str | Path, model_dir: str | Path, config_path: str | Path,
             output_dir: str | Path | None = None, resume: bool = False, trust_remote_code: bool = False) -> Path:
    """Train LoRA adapters; checkpoints go to output_dir/checkpoint-N, the final adapter to output_dir/final."""
    import torch
    from peft import get_peft_config, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from .collate import make_collator
    from .train_log import CountingTrainer, write_charts

    cfg = load_config(config_path)
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FinetuneError(f"{model_dir} is not a model directory (no config.json)")
    train_path = data_dir / cfg.data_config.train_file
    if not train_path.is_file():
        raise FinetuneError(f"no training file {train_path}; run `lawchat prepare` first")
    val_path = data_dir / cfg.data_config.val_file if cfg.data_config.val_file else None

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise FinetuneError(f"{model_dir}: the tokenizer has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    report: dict = {}
    train_rows = encode_split(tokenizer, load_conversations(train_path), cfg, "train", report)
    val_rows = (encode_split(tokenizer, load_conversations(val_path), cfg, "dev", report)
                if val_path is not None and val_path.is_file() else [])

    args = dict(cfg.training_args)
    config_out = args.pop("output_dir", "runs/lora")
    out = Path(output_dir or config_out)
    if not val_rows:  # the seed crashed on a tiny or missing dev set; here evaluation is just skipped
        args["eval_strategy"] = "no"
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args.setdefault("bf16", use_bf16)
    if args["bf16"] and not torch.cuda.is_available():
        args.setdefault("use_cpu", True)        # transformers asks for it to run bf16 on the CPU (autocast)
    args.setdefault("report_to", "none")
    if cfg.batching == "grouped":
        args.update(length_grouping_args())
    training_args = TrainingArguments(output_dir=str(out), **args)

    # on CUDA bf16 weights; on the CPU fp32 weights under bf16 autocast (measured faster there: the elementwise ops stay fp32)
    bf16_weights = training_args.bf16 and torch.cuda.is_available()
    quant = {}
    if cfg.quantization:     # QLoRA: the frozen base quantised on load, on this process's GPU
        quant = dict(quantization_config=quantization_config(cfg.quantization),
                     device_map={"": training_args.local_process_index})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16_weights else torch.float32,
                                                 trust_remote_code=trust_remote_code, **quant)
    if (cfg.batching == "packed" or cfg.attention == "varlen") and not model.is_backend_compatible():
        raise FinetuneError(f"{model_dir}: batching: packed and attention: varlen need a model whose attention "
                            f"transformers can swap, and {type(model).__name__} is not one (a THUDM ChatGLM3 checkpoint: "
                            "`lawchat convert` it first); or set batching: grouped and attention: sdpa in the config")
    if cfg.attention == "varlen":
        from .attention import register
        model.set_attn_implementation(register())
    model.config.use_cache = False    # training needs no KV cache; with one, transformers skips the packed-sequence mask
    from .kernels import apply_liger, liger_available
    liger = cfg.liger_kernel is True or (cfg.liger_kernel == "auto" and liger_available())
    if liger:
        print(f"train: liger-kernel: {apply_liger(model)}", file=sys.stderr)
    elif cfg.liger_kernel == "auto":
        print("train: liger-kernel: off (needs CUDA and `pip install 'lawchat[train-gpu]'`)", file=sys.stderr)
    if cfg.quantization:     # PEFT's preparation as designed: norms and embeddings fp32, checkpointing, input grads
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs)
    peft_cfg = dict(cfg.peft_config)
    if not peft_cfg.get("target_modules") and model.config.model_type in DEFAULT_TARGET_MODULES:
        peft_cfg["target_modules"] = DEFAULT_TARGET_MODULES[model.config.model_type]
    peft_model = get_peft_model(model, get_peft_config(peft_cfg))
    if training_args.gradient_checkpointing:
        peft_model.enable_input_require_grads()     # frozen embeddings: checkpointed blocks still need a grad path
    if training_args.process_index == 0:
        peft_model.print_trainable_parameters()

    from .train_log import LABELLED_LOGITS_TYPES
    labelled = cfg.labelled_logits and not liger and model.config.model_type in LABELLED_LOGITS_TYPES
    trainer = CountingTrainer(model=peft_model, args=training_args, train_dataset=train_rows,
                              eval_dataset=val_rows or None, data_collator=make_collator(tokenizer, cfg.batching == "packed"),
                              labelled_logits=labelled)
    last = get_last_checkpoint(str(out)) if resume and out.is_dir() else None
    if resume and last is None and trainer.is_world_process_zero():
        print(f"train: --resume given but no checkpoint in {out}; starting fresh", file=sys.stderr)
    result = trainer.train(resume_from_checkpoint=last)

    final = out / "final"
    trainer.save_model(final)                   # rank 0 only under torchrun; the adapter, not the base
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final)
        if cfg.quantization:
            (final / QUANT_FILE).write_text(json.dumps(cfg.quantization, indent=2) + "\n", encoding="utf-8")
            report["quantization"] = cfg.quantization
        report["train_loss"] = result.training_loss
        report["global_step"] = result.global_step
        report["world_size"] = training_args.world_size
        report["batching"] = cfg.batching
        report["labelled_logits"] = labelled
        report["attention"] = model.config._attn_implementation     # what the model really ran
        report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
        report["log_history"] = trainer.state.log_history
        (out / "train_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        write_charts(trainer.state.log_history, out)
    return final

