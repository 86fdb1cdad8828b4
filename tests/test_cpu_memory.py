"""softsae.cpu_memory (freed memory kept in the process for CPU training) and the trainer's optimizer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from softsae.trainer import make_optimizer

PROBE = "from softsae.cpu_memory import keep_freed_memory, is_applied; print(keep_freed_memory(), is_applied())"


def _probe(mode: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SOFTSAE_CPU_MALLOC"}
    if mode is not None:
        env["SOFTSAE_CPU_MALLOC"] = mode
    return subprocess.run([sys.executable, "-P", "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _glibc(), reason="the setting exists only for glibc")
def test_applied_by_default_on_glibc():
    r = _probe(None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


def test_opt_out_leaves_malloc_alone():
    r = _probe("default")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_bad_setting_names_the_variable():
    r = _probe("sometimes")
    assert r.returncode != 0 and "SOFTSAE_CPU_MALLOC" in r.stderr


def test_optimizer_is_fused_adam_with_the_recipe_betas():
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.zeros(3))]
    opt = make_optimizer(params, 1e-3)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adam) and group["fused"] and group["betas"] == (0.9, 0.999)
    # one step equals the default implementation's (the state dict is interchangeable)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.Adam(ref_params, lr=1e-3, betas=(0.9, 0.999))
    for ps in (params, ref_params):
        for p in ps:
            p.grad = torch.ones_like(p)
    opt.step()
    ref.step()
    for a, b in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, b)
    ref.load_state_dict(opt.state_dict())
