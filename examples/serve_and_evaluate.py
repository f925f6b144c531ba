"""Train, hotload every sampler checkpoint into a running vLLM server, and evaluate through the serving path.

Start the server first (docs/serving.md), on the base this run trains:

    lightning-lora-ckpt export-base tiny-qwen3-hd32 ./served-base
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server \
        --model ./served-base --dtype float32 --enable-lora --max-lora-rank 16 --port 8000

then:

    python examples/serve_and_evaluate.py --url http://127.0.0.1:8000

Each sampler checkpoint (every 10 steps, and ``final``) is loaded into the server as soon as it is committed;
after training, each checkpoint still served is scored through ``DeploymentSampler``: the mean log-probability
vLLM gives to the greedy continuation of a few held-out prompts, and whether its tokens equal what
``SamplingClient`` (PEFT, in this process) samples from the same checkpoint.
"""

from __future__ import annotations

import argparse
import statistics

import lightning as L

from lightning_lora_ckpt import (
    DeploymentSampler,
    JSONLDataModule,
    LoRACheckpointIO,
    LoRAModule,
    PeriodicCheckpoint,
    SamplingClient,
    SamplingParams,
    VLLMHotload,
)

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the vLLM server")
    parser.add_argument("--root", default="./checkpoints", help="checkpoint root (any fsspec URI)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-lora-rank", type=int, default=16, help="the server's --max-lora-rank")
    args = parser.parse_args()

    hotloader = VLLMHotload(args.url, keep=2, max_lora_rank=args.max_lora_rank)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        plugins=[LoRACheckpointIO(root=args.root, run_id="served")],
        callbacks=[PeriodicCheckpoint(every_n_train_steps=10, kind="sampler"), hotloader],
        logger=False,
        enable_checkpointing=False,
    )
    module = LoRAModule("tiny-qwen3-hd32", rank=8, learning_rate=3e-3)
    data = JSONLDataModule("examples/data/demo_train.jsonl", batch_size=4)
    trainer.fit(module, datamodule=data)

    greedy = SamplingParams(max_tokens=16, temperature=0, stop=[])
    for served in hotloader.served:
        sampler = DeploymentSampler(args.url, served, tokenizer=module.get_tokenizer())
        local = SamplingClient.from_checkpoint(served.uri)
        samples = [sampler.sample(prompt, greedy).sequences[0] for prompt in PROMPTS]
        same = all(
            s.tokens == local.sample(p, greedy).sequences[0].tokens for s, p in zip(samples, PROMPTS, strict=True)
        )
        score = statistics.mean(statistics.mean(s.logprobs) for s in samples)
        print(f"{served.vllm_name}: mean logprob {score:.3f}, same tokens as SamplingClient: {same}")
    print(f"seconds from each save to the server serving it: {[round(s, 2) for s in hotloader.latencies]}")


if __name__ == "__main__":
    main()
