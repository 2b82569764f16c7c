"""Resolve once (issue 14): one `distill` start reads the teacher checkpoint's meta.json once and
parses its ModelConfig once; the builders take the resolved plan (TeacherSpec)."""
from pathlib import Path

from distkit import distill_config, make_teacher_checkpoint


def test_teacher_meta_read_once_per_start(dist1, tmp_path, monkeypatch):
    import megatron_kd.training.checkpoint as ckpt
    from megatron_kd.distill.run import run_distill
    from megatron_kd.models.config import ModelConfig

    teacher = str(tmp_path / "teacher")
    make_teacher_checkpoint(teacher)
    teacher_dir = Path(teacher).resolve()
    reads, parses = [], []
    read_json = ckpt.read_json

    def counting_read_json(path, *args, **kwargs):
        if Path(path).resolve().is_relative_to(teacher_dir) and Path(path).name == "meta.json":
            reads.append(str(path))
        return read_json(path, *args, **kwargs)

    from_dict = ModelConfig.from_dict.__func__

    def counting_from_dict(cls, data):
        cfg = from_dict(cls, data)
        if cfg.num_layers == 4:  # the teacher's shape (distkit.TEACHER)
            parses.append(1)
        return cfg

    monkeypatch.setattr(ckpt, "read_json", counting_read_json)
    monkeypatch.setattr(ModelConfig, "from_dict", classmethod(counting_from_dict))
    result = run_distill(distill_config(teacher, steps=2, save=str(tmp_path / "student")))
    assert result["iteration"] == 2
    assert len(reads) == 1, reads
    assert len(parses) == 1, len(parses)
