"""A small PyTorch MLP trained by mlmath_native.torch.AdamW with bfloat16 optimizer state, a
OneCycleLR schedule and a checkpoint saved and restored through torch.save / torch.load."""

import os
import tempfile

import torch

import mlmath_native.torch as mt

torch.manual_seed(0)
x = torch.randn(512, 16)
y = torch.sin(x[:, :4].sum(dim=1, keepdim=True))


def make():
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    opt = mt.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, state_dtype="bfloat16")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=120)
    return model, opt, sched


def train(model, opt, sched, steps):
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


model, opt, sched = make()
print(f"loss after 60 steps: {train(model, opt, sched, 60):.4f}")
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "checkpoint.pt")
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path
    )
    checkpoint = torch.load(path)
model, opt, sched = make()  # a fresh run, restored from the checkpoint
model.load_state_dict(checkpoint["model"])
opt.load_state_dict(checkpoint["opt"])
sched.load_state_dict(checkpoint["sched"])
print(f"loss after 120 steps: {train(model, opt, sched, 60):.4f}")
