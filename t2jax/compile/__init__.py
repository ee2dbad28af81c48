"""`python -m t2jax.compile --config CONFIG --topology v5e:4x4 [--config.model=llama3_8b] ...`

Says, before paying for a pod, whether a training config fits on a TPU topology. Nothing is
loaded: params, SVD factors, z and the optimizer state are abstract (shapes, dtypes and the
shardings `t2jax.sharding` gives them on the config's mesh), and the programs one training
step runs are compiled ahead of time for the topology by libtpu on this (CPU) machine:

  update       trainer.train_step: loss, gradient in z, optimizer (B·G rollouts)
  materialise  svf.materialise: the rollout params W' for the current z
  prefill      sampling.prefill of B·G rows, cache P + C rounded as sampling.run does
  decode       sampling.decode (the while loop over C new tokens)

They are the programs training runs: t2jax.programs builds them, with their shardings and
abstract inputs, for both.

The package, one job a module: topology (a topology's compile-only devices and their HBM),
abstract (params and SVD factors as sharded ShapeDtypeStructs, what stays resident), plan (a
training step's programs compiled for a topology), report (what XLA says of each compiled
program, extrapolation, the text), roofline (the PROJECTED times), cli (the flags).

Per device, from XLA's buffer assignment (`compiled.memory_analysis()`):

  total = XLA peak + other live
  XLA peak = the most bytes live at one moment of the program: its arguments and outputs
             (a donated argument that becomes an output counted once), the temporaries live
             at that moment, the generated code
  other live = buffers the training loop keeps on the device beside the program without
             passing them to it: while sampling, the base params, SVD factors and train state

The plain sum arguments + outputs − aliased + temporaries + code is an upper bound (`bound` in
the JSON): XLA lays temporaries that are never live together over the same bytes, and on big
programs the sum overstates the peak by a quarter (8B update on v5e:4x4: 18.1 vs 13.9 GiB,
which XLA compiled for a 15.75 GiB device). The peak is the number XLA's own out-of-memory
check uses; a program fits when its total is at most what XLA lets a program use on the device
(`usable_hbm`: 15.75 of v5e's 16 GiB). A program XLA refuses to compile for lack of HBM does
not fit; the report shows XLA's message and the size in it: "Used X of Y hbm" is a peak, "total
memory required for HLO temporaries (X)" (a check made before XLA lays buffers out) a sum like
the bound. Exit status: 0 all fit, 1 something does not fit, 2 a usage error.

Layers follow config.scan_layers, "auto" resolved for the TPU: stacked and run under lax.scan,
so a program's size and compile time do not grow with depth (`--config.scan_layers=False`
compiles them unrolled, as a CPU run executes them).
A model too big to compile whole on this host (layers unrolled): `--layers N` compiles
its first N decoder layers (PARTIAL), `--extrapolate A,B` compiles the first A and the first B
and reports the whole model with every size grown by the per-layer cost (EXTRAPOLATED: an
estimate; on the default model each program's total came within -11 % / +74 % of the whole
compile, params, factors and arguments exactly).

PROJECTED times (roofline.py), not measured: per chip, each program takes max(flops / bf16
peak FLOP/s, bytes accessed / HBM bandwidth), from XLA's `cost_analysis()` and the chip's
published peaks (v4, v5e, v5p, v6e); the update step is the update program, a decode step the
decode program's loop body (one token for every row), tokens/s the rows over it. XLA counts a
loop body once, so with layers scanned or the update in microbatches the costs come from two
more small compiles (1 and 2 unrolled layers, one microbatch) grown to the model's depth.

  python -m t2jax.compile --config configs/math.py --topology v5e:2x2
  python -m t2jax.compile --config configs/math.py --topology v5e:4x4 \
      --config.model=llama3_8b --config.dtype=bfloat16 --config.mesh=fsdp:-1 \
      --config.batch_size=64 --config.max_new_tokens=512 --prompt_len=256 \
      --config.microbatches=8 --config.remat=True
"""

from __future__ import annotations

GIB = 2**30


class CompileUsageError(ValueError):
  """A topology, model or shape the command cannot plan for; the message says what to do."""
