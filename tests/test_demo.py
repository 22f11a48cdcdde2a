import io

from meshmerge.demo import run


def test_in_process_demo_converges_under_loss() -> None:
    out = io.StringIO()
    assert run(replicas=4, trainers=6, loss=0.5, seed=7, out=out)
    text = out.getvalue()
    assert "CONVERGED" in text
    digests = {line.split()[-1] for line in text.splitlines() if line.startswith("node-")}
    assert len(digests) == 1
