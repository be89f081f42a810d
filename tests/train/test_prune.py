"""Pruning: channel pruning really shrinks the model and its ONNX; unstructured pruning keeps its zeros."""



from tests.helpers import quiet
from toolkit.models.checkpoint import load_checkpoint, model_from_checkpoint
from toolkit.export import export
from toolkit.train.prune import prune
from toolkit.check.verify import verify



def test_channel_pruning_shrinks_and_passes_parity(fine4_run, fine4_export, mnist_root, tmp_path):
    report = prune(fine4_run.run_dir, method="channel", amount=0.3, finetune_epochs=1, out=tmp_path / "runs", data_dir=mnist_root,
                   device="cpu", train_limit=5000, download=False, console=quiet())
    before, after = report["before"], report["after"]
    assert before["params"] == 7974 and after["params"] < 0.7 * before["params"]
    assert after["macs"] < 0.7 * before["macs"]
    assert after["test_acc"] > 80  # one short fine-tuning epoch recovers most of it (chance is 10%)
    # the pruned checkpoint rebuilds with its narrower layers and exports a smaller ONNX that passes parity
    model = model_from_checkpoint(load_checkpoint(report["checkpoint"]))
    assert sum(p.numel() for p in model.parameters()) == after["params"]
    entry = export(report["run_dir"], out=tmp_path / "exports", console=quiet())
    assert entry["bytes"] < (fine4_export / "model.fp32.onnx").stat().st_size
    result = verify(entry["export_dir"], data_dir=mnist_root, download=False, console=quiet())
    assert result["passed"] and result["results"][0]["delta_pp"] == 0.0


def test_l1_unstructured_pruning_keeps_its_sparsity(fine4_run, mnist_root, tmp_path):
    report = prune(fine4_run.run_dir, method="l1-unstructured", amount=0.5, finetune_epochs=1, out=tmp_path, data_dir=mnist_root,
                   device="cpu", train_limit=2000, download=False, console=quiet())
    assert report["before"]["sparsity"] == 0.0
    assert report["pruned"]["sparsity"] == 50.0 and report["after"]["sparsity"] == 50.0  # zeros survived fine-tuning
    assert report["after"]["params"] == report["before"]["params"]  # same shapes: sparsity, not a smaller file
