"""One rank of a two-process Jacobian-lens fit (tests/test_jacobian_lens.py starts two):
``python distributed_fit.py OUT`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set."""

import sys

import torch
import torch.distributed as dist

import lens_linear as ll
from lens_linear.jacobian_lens import fit_jacobian_lens

PROMPTS = [f"prompt {i}: the quick brown fox jumps over {i} lazy dogs" for i in range(5)]

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = ll.tiny_model("llama", n_layers=3)
    lens = fit_jacobian_lens(model, PROMPTS, skip_first_positions=4, progress=False)
    torch.save({"J": lens.jacobians, "n": lens.n_prompts}, f"{sys.argv[1]}.rank{dist.get_rank()}")
    dist.destroy_process_group()
