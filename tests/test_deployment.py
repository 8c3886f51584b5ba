"""The nightly job on a cluster it did not start: a scheduler that speaks TLS, with the client's
certificates from Dask's own configuration (environment variables), as docs/deployment.md says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _region(root: Path) -> Path:
    from test_region import _bias_model

    from pipeline.demo.write import write_demo_data

    model = _bias_model(root / "always.safetensors", bias=5.0)
    paths = write_demo_data(root / "scene", size=186, seed=1, product="L1C")
    scene = paths.scene_yaml
    scene.write_text(scene.read_text() + f"\nmodel:\n  path: {model}\n")
    region = root / "region.yaml"
    region.write_text(f"name: tls\nscenes: [{scene}]\noutput:\n  dir: {root / 'out'}\n  quicklook: false\n")
    return region


def test_a_region_runs_on_a_tls_scheduler_with_the_certificates_of_dask_config(tmp_path: Path) -> None:
    from distributed import LocalCluster
    from distributed.security import Security

    region = _region(tmp_path)
    sec = Security.temporary()  # a CA and a certificate signed by it, as PEM text
    certs = {}
    for name, pem in (("CA_FILE", sec.tls_ca_file), ("CLIENT__CERT", sec.tls_client_cert),
                      ("CLIENT__KEY", sec.tls_client_key)):
        path = tmp_path / f"{name.lower()}.pem"
        path.write_text(pem)
        certs[f"DASK_DISTRIBUTED__COMM__TLS__{name}"] = str(path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DISTRIBUTED__COMM__TLS")}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, security=sec,
                      dashboard_address="127.0.0.1:0") as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        command = [sys.executable, "-m", "pipeline", "region", str(region), "--scheduler", address]
        refused = subprocess.run(command, cwd=ROOT, env=base, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0
        assert "no TLS settings for the client" in refused.stderr and "DASK_DISTRIBUTED__COMM__TLS__CA_FILE" \
            in refused.stderr and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        before = cluster.scheduler.transition_counter
        done = subprocess.run(command, cwd=ROOT, env={**base, **certs}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "region tls: 1 scene(s) processed" in done.stdout
        # the scene's blocks ran on the cluster's worker, reached over TLS
        assert cluster.scheduler.transition_counter > before + 10, "no task ran on the TLS cluster"
    assert (tmp_path / "out" / "tls.gpkg").is_file()
