"""Writes the trainer fixtures in tests/trainers/data/: tiny trajectories that the real trainers saved, so
that the tests read what OLMo-core, PyTorch Lightning, transformers, DeepSpeed, megatron-core, torchtitan
and nanoGPT write, never look-alikes. Run by `make fixtures` in an environment with the trainers installed (torch held
at the local build):

    pip install -c constraints.txt ai2-olmo-core==3.0.0 pytorch-lightning==2.6.6 megatron-core==0.16.1 \
        torchtitan==0.3.0 triton
    pip install -c constraints.txt --no-build-isolation deepspeed==0.19.8
    python tests/trainers/write.py --out tests/trainers/data [--nanogpt PATH-TO-A-NANOGPT-CLONE] [NAME ...]

Each model is a few thousand float32 parameters trained for a few steps on random tokens (2 cores, gloo):
what matters is the layout each trainer gives its checkpoints, and that the steps differ. Distributed
saves run their ranks with `torch.multiprocessing.spawn` on 127.0.0.1. OLMo-core's 2-rank run sometimes
stops making progress on a 2-core machine (2 runs of 5 here, at different steps): run it again.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VOCAB, SEQ = 64, 16


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")


def _spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, _port(), *args), nprocs=world)


def _tokens(n: int = 4096, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (n,), generator=torch.Generator().manual_seed(seed))


# --- OLMo-core: its Trainer, checkpointer and merge callbacks, 1 process and 2-process FSDP --------------------

def olmo_core_config():
    """The fixture's OLMo-core model: OLMo2's 1M config on 2 layers, with a head size that transformers'
    Olmo2 takes (d_model / n_heads), so that OLMo-core's HF converter takes it."""
    from olmo_core.nn.transformer import TransformerConfig

    return TransformerConfig.olmo2_1M(vocab_size=VOCAB, n_layers=2, n_heads=2, head_dim=6, hidden_size_multiple_of=16)


def _olmo_core(rank: int, world: int, port: int, out: str, work: str, fsdp: bool) -> None:
    _dist_env(rank, world, port)
    import numpy as np
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.optim import AdamWConfig
    from olmo_core.train import Duration, TrainerConfig, prepare_training_environment
    from olmo_core.train.callbacks import CheckpointerCallback, ModelMergeCallback
    from olmo_core.train.train_module import TransformerDataParallelConfig, TransformerTrainModuleConfig

    prepare_training_environment(seed=0, backend="gloo")
    tokens = Path(work) / "tokens.npy"
    if rank == 0:
        _tokens().numpy().astype(np.uint16).tofile(tokens)
    torch.distributed.barrier()
    tokenizer = TokenizerConfig(vocab_size=VOCAB, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 2)
    dataset = NumpyFSLDatasetConfig(paths=[str(tokens)], sequence_length=SEQ, tokenizer=tokenizer,
                                    work_dir=str(Path(work) / "dataset")).build()
    loader = NumpyDataLoaderConfig(global_batch_size=4 * SEQ, seed=0, num_workers=0).build(dataset)
    model = olmo_core_config().build(init_device="cpu")
    dp = TransformerDataParallelConfig(name=DataParallelType.fsdp) if fsdp else None
    module = TransformerTrainModuleConfig(rank_microbatch_size=2 * SEQ // world * world, max_sequence_length=SEQ,
                                          optim=AdamWConfig(lr=1e-2), dp_config=dp).build(
        model, device=torch.device("cpu"))
    callbacks = {"checkpointer": CheckpointerCallback(save_interval=2, ephemeral_save_interval=None)}
    if not fsdp:  # its own in-memory mean of the last steps, saved as stepN-merged/: not a step to average
        callbacks["merge"] = ModelMergeCallback(enabled=True, merge_step=6, merge_last_n_steps=2)
    trainer = TrainerConfig(save_folder=out, max_duration=Duration.steps(6), metrics_collect_interval=1,
                            callbacks=callbacks).build(module, loader)
    trainer.fit()


def olmo_core(out: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        _spawn(_olmo_core, 1, str(out), work, False)


def olmo_core_fsdp(out: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        _spawn(_olmo_core, 2, str(out), work, True)


# --- PyTorch Lightning: ModelCheckpoint's `epoch=E-step=N.ckpt` files and `last.ckpt` ---------------------------

def _tiny_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 48),
                               torch.nn.GELU(), torch.nn.Linear(48, VOCAB))


def _batches(n: int, batch: int = 4):
    tokens = _tokens(n * batch * (SEQ + 1)).view(n * batch, SEQ + 1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=batch)


@functools.cache
def lightning_module() -> type:
    """The LightningModule the fixture trains (and a test loads an average into)."""
    import pytorch_lightning as pl

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny_lm()
            self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # an integer buffer: copied

        def training_step(self, batch, _):
            (tokens,) = batch
            self.seen += tokens.numel()
            logits = self.model(tokens[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return LM


def lightning(out: Path) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    checkpoints = ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, callbacks=[checkpoints], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(lightning_module()(), _batches(6))


def _lightning_model_parallel_run(out: str) -> None:
    """Lightning's ModelParallelStrategy over 2 processes (FSDP2 data parallel), each `.ckpt` a DCP folder.
    Lightning starts the second process by running this same command line again."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import ModelParallelStrategy

    class Sharded(lightning_module()):
        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    checkpoints = ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=2, callbacks=[checkpoints], logger=False,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
    trainer.fit(Sharded(), _batches(12))


def lightning_model_parallel(out: Path) -> None:
    subprocess.run([sys.executable, __file__, "--lightning-model-parallel-run", str(out)], check=True,
                   env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), GLOO_SOCKET_IFNAME="lo"))


# --- transformers' Trainer: `checkpoint-N/` with model.safetensors ------------------------------------------------

def hf_trainer(out: Path) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=48,
                                             max_position_embeddings=SEQ))
    rows = _tokens(24 * SEQ).view(24, SEQ)
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], logging_strategy="no",
                             save_only_model=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()


# --- accelerate's FSDP save: checkpoint-N/pytorch_model_fsdp_0/ (DCP), as the Trainer writes it under FSDP -------

def _accelerate_fsdp(rank: int, world: int, port: int, out: str) -> None:
    _dist_env(rank, world, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, save_fsdp_model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    # accelerate on a CPU falls back to DDP, so the model is sharded by hand and saved by accelerate's own
    # function, which the Trainer calls for its checkpoints under FSDP
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=48,
                                             max_position_embeddings=SEQ))
    sharded = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    optimizer = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin(state_dict_type="SHARDED_STATE_DICT")
    for step, (tokens,) in enumerate(_batches(6), start=1):
        sharded(input_ids=tokens[:, :SEQ], labels=tokens[:, :SEQ]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            folder = Path(out) / f"checkpoint-{step}"
            save_fsdp_model(plugin, accelerator, sharded, str(folder))
            if rank == 0:
                model.config.save_pretrained(folder)
    torch.distributed.destroy_process_group()


def accelerate_fsdp(out: Path) -> None:
    _spawn(_accelerate_fsdp, 2, str(out))


# --- DeepSpeed: ZeRO-2 `global_stepN/` folders and `latest` -----------------------------------------------------

def _deepspeed(rank: int, world: int, port: int, out: str) -> None:
    _dist_env(rank, world, port)
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    deepspeed.init_distributed("gloo")
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    model = _tiny_lm()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for step, (tokens,) in enumerate(_batches(6), start=1):
        logits = engine(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        if step % 2 == 0:
            engine.save_checkpoint(out)
    for script in Path(out).glob("zero_to_*.py"):  # the consolidation scripts it copies in: its code, not data
        script.unlink()


def deepspeed(out: Path) -> None:
    _spawn(_deepspeed, 1, str(out))


# --- megatron-core: `torch_dist` saves (DCP + metadata.json + common.pt), layers stacked on dim 0 -------------------

def megatron_model():
    """The fixture's megatron-core GPT (in a process whose gloo group and model parallelism are set up)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    # patches to run on a CPU: its attention puts scratch buffers on CUDA's device and forks CUDA's RNG,
    # its writer synchronizes CUDA before it copies tensors out
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *_, **__: None
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().fork = lambda *_, **__: contextlib.nullcontext()
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                               use_cpu_initialization=True, pipeline_dtype=torch.float32)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                    max_sequence_length=SEQ)


def _megatron(rank: int, world: int, port: int, out: str) -> None:
    """`world` ranks, all of them tensor-parallel: with 2, column-parallel weights are saved as row shards and
    row-parallel ones (linear_proj, linear_fc2) as column shards."""
    _dist_env(rank, world, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state

    parallel_state.initialize_model_parallel(world, 1)
    torch.manual_seed(0)
    model = megatron_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step, (tokens,) in enumerate(_batches(6), start=1):
        positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
        causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
        losses = model(tokens[:, :-1], positions, causal, labels=tokens[:, 1:])
        losses.float().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            folder = Path(out) / f"iter_{step:07d}"
            folder.mkdir(parents=True, exist_ok=True)
            dist_checkpointing.save({"model": model.sharded_state_dict()}, str(folder))  # as Megatron-LM saves
    if rank == 0:
        (Path(out) / "latest_checkpointed_iteration.txt").write_text("6")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def megatron(out: Path) -> None:
    _spawn(_megatron, 1, str(out))


def megatron_tp2(out: Path) -> None:
    _spawn(_megatron, 2, str(out))


# --- torchtitan: its CheckpointManager's `checkpoint/step-N/` (DCP), from its own model and optimizer container --

def _torchtitan(rank: int, world: int, port: int, out: str) -> None:
    _dist_env(rank, world, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import torchtitan.models.llama3 as llama3
    from torchtitan.components.checkpointer.dcp import CheckpointManager
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import default_adamw
    from torchtitan.models.common import Embedding, Linear, RMSNorm
    from torchtitan.models.common.rope import ComplexRoPE

    dim = 16
    config = llama3.Llama3Model.Config(
        dim=dim, vocab_size=VOCAB,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim, param_init=llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB, param_init=llama3._output_linear_init(dim)),
        layers=llama3._build_llama3_layers(fuse_qkv=True, n_layers=2, dim=dim, n_heads=2, hidden_dim=32,
                                           rope=ComplexRoPE.Config(dim=8, max_seq_len=SEQ, theta=500000,
                                                                   scaling="llama"), attn_backend="flex"))
    torch.manual_seed(0)
    model = config.build()
    optimizer_config = default_adamw(lr=1e-2)
    optimizer_config.implementation = "for-loop"  # ("fused" is CUDA's)
    optimizers = optimizer_config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optimizers, training_steps=6)
    checkpoints = CheckpointManager(
        CheckpointManager.Config(enable=True, folder="checkpoint", interval=2, last_save_model_only=False),
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers, states={},
        sd_adapter=None, base_folder=out)
    # FlexAttention has no backward on a CPU: each step is its optimizer's update from random gradients
    g = torch.Generator().manual_seed(1)
    for step in range(1, 7):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.1
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        checkpoints.save(curr_step=step, last_step=step == 6)
    checkpoints.close()
    torch.distributed.destroy_process_group()


def torchtitan(out: Path) -> None:
    _spawn(_torchtitan, 1, str(out))


# --- nanoGPT: its own train.py, run from a clone; it overwrites out_dir/ckpt.pt, so each save is kept in iterN/ ----

def nanogpt(out: Path, clone: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in ("train.py", "model.py", "configurator.py"):
            shutil.copy(clone / name, work / name)
        data = work / "data" / "tiny"
        data.mkdir(parents=True)
        for split in ("train", "val"):
            _tokens(8192, seed=int(split == "val")).numpy().astype("uint16").tofile(data / f"{split}.bin")
        (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": VOCAB}))  # else GPT-2's 50304 tokens
        common = ["--dataset=tiny", "--device=cpu", "--dtype=float32", f"--block_size={SEQ}", "--batch_size=4",
                  "--n_layer=2", "--n_head=2", "--n_embd=32", "--eval_interval=2", "--eval_iters=1",
                  "--log_interval=100", "--always_save_checkpoint=True", "--out_dir=run", "--bias=False",
                  "--learning_rate=1e-2", "--decay_lr=False", "--gradient_accumulation_steps=1",
                  "--compile=True"]
        for i, iters in enumerate((2, 4, 6)):
            resume = ["--init_from=resume"] if i else []
            subprocess.run([sys.executable, "train.py", *common, f"--max_iters={iters}", *resume], cwd=work,
                           check=True, stdout=subprocess.DEVNULL)
            (out / f"iter{iters}").mkdir(parents=True)
            shutil.copy(work / "run" / "ckpt.pt", out / f"iter{iters}" / "ckpt.pt")


WRITERS = {"olmo-core": olmo_core, "olmo-core-fsdp": olmo_core_fsdp, "lightning": lightning,
           "lightning-model-parallel": lightning_model_parallel, "accelerate-fsdp": accelerate_fsdp,
           "hf-trainer": hf_trainer, "deepspeed": deepspeed, "megatron": megatron, "megatron-tp2": megatron_tp2,
           "torchtitan": torchtitan, "nanogpt": nanogpt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--nanogpt", type=Path, help="a clone of nanoGPT, whose train.py is run")
    parser.add_argument("names", nargs="*", choices=[[], *WRITERS], help="the trainers to run (all by default)")
    parser.add_argument("--lightning-model-parallel-run", help=argparse.SUPPRESS)  # (the run itself, per rank)
    args = parser.parse_args()
    if args.lightning_model_parallel_run:
        _lightning_model_parallel_run(args.lightning_model_parallel_run)
        return
    for name in args.names or WRITERS:
        if name == "nanogpt" and args.nanogpt is None:  # (what is there is kept)
            print("nanogpt: skipped (give --nanogpt PATH, a clone of github.com/karpathy/nanoGPT)")
            continue
        target = args.out / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        print(f"{name}: writing {target}", flush=True)
        if name == "nanogpt":
            nanogpt(target, args.nanogpt)
        else:
            WRITERS[name](target.absolute())


if __name__ == "__main__":
    main()
