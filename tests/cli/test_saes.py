"""SAEs from the command line: features archived, their error and L0 in the summary and the progress lines, a
badly reconstructing SAE reported loudly, a mismatched one refused before anything starts."""

import numpy as np
from helpers import load_json, run_cli, write_sae

import gemmalens

RUN = ["--max-tokens", 3, "--temperature", 0, "--batch-size", 4]


def test_an_attached_sae_is_archived_and_measured(tmp_path, tiny_folder):
    write_sae(tmp_path, "resid_post/layer_1_width_128_l0_small", "model.layers.1.output", 64, exact=True)
    write_sae(tmp_path, "resid_post_all/layer_2_width_48_l0_big", "model.layers.2.output", 64)
    exact, noisy = "resid_post_layer_1_width_128_l0_small", "resid_post_all_layer_2_width_48_l0_big"
    out = tmp_path / "out"
    done = run_cli("run", "--model", tiny_folder, *RUN, "--sae", tmp_path / "resid_post/layer_1_width_128_l0_small",
                   "--sae", tmp_path / "resid_post_all/layer_2_width_48_l0_big", "--capture", f"sae.{exact}.*",
                   "--capture", "model.layers.1.resid_out", "--output-dir", out, "--progress-every", 0.1)
    assert done.returncode == 0, done.stderr
    summary = load_json(out / "summary.json")
    assert summary["saes"][exact]["mean_error"] < 1e-6 and summary["saes"][exact]["positions"] > 8
    assert summary["saes"][noisy]["mean_error"] > 0.5 and 0 < summary["saes"][noisy]["mean_l0"] < 48
    warning = f"SAE {noisy} reconstructs its site badly"
    assert warning in done.stderr and any(warning in note for note in summary["notes"])
    assert not any(exact in note for note in summary["notes"])
    archive = gemmalens.open_activations(out)
    positions, x = archive.trajectory("model.layers.1.resid_out", 5)
    _, features = archive.trajectory(f"sae.{exact}.features", 5)
    assert np.allclose(features, np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], -1), atol=1e-5)
    assert np.allclose(archive.trajectory(f"sae.{exact}.error", 5)[1], 0, atol=1e-6)


def test_an_sae_of_another_model_is_refused_before_anything_starts(tmp_path, tiny_folder):
    write_sae(tmp_path, "resid_post/layer_1_width_48_l0_small", "model.layers.1.output", 640)
    out = tmp_path / "out"
    refused = run_cli("run", "--model", tiny_folder, *RUN, "--sae", tmp_path / "resid_post/layer_1_width_48_l0_small",
                      "--output-dir", out)
    assert refused.returncode == 2 and "d_in 640 but the model's model.layers.1.resid_out has 64" in refused.stderr
    assert not out.exists()
