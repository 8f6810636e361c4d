"""The blow-up rule on a real (tiny) Coqui Vits and a real batch: what makes an exception from
Coqui's forward instability (roll back) rather than a bug (fail loudly)."""

import pytest
import torch

from vits_ray.blowup import judge_blowup, largest_norm_jump, module_norms
from vits_ray.step import Precision, eval_step


@pytest.fixture(scope="module")
def vits(prepared_demo):
    from vits_ray.config import load_config
    from vits_ray.data.reader import ShardReader
    from vits_ray.data.shards import read_manifest
    from vits_ray.model import build_model
    from vits_ray.storage import open_store
    from vits_ray.text import Vocabulary

    cfg = load_config("tiny")
    store = open_store(str(prepared_demo))
    manifest = read_manifest(store)
    model = build_model(cfg, Vocabulary.from_dict(manifest["vocab"]))
    reader = ShardReader(store, manifest, "val", 0, 1, seed=1, batch_size=2, max_batch_seconds=30.0,
                         pad_id=int(model.tokenizer.characters.pad_id))
    try:
        batch = next(iter(reader.iter_epoch(0)))
    finally:
        reader.close()
    inputs = model.format_batch_on_device(model.format_batch(batch.to_coqui(torch.device("cpu"))))
    return model, model.get_criterion(), inputs, {k: v.clone() for k, v in model.state_dict().items()}


def validation(model, criteria, inputs):
    return lambda: eval_step(model, criteria, inputs, Precision.resolve("no", "cpu"))


def raised(forward) -> Exception:
    with pytest.raises(Exception) as err:
        forward()
    return err.value


def scaled_duration_predictor(model, pristine, factor: float) -> None:
    model.load_state_dict(pristine)
    with torch.no_grad():
        for param in model.duration_predictor.parameters():
            param.mul_(factor)


def test_huge_but_finite_weights_raising_in_validation_are_instability(vits):
    model, criteria, inputs, pristine = vits
    model.load_state_dict(pristine)
    reference = module_norms(model)
    scaled_duration_predictor(model, pristine, 1e10)  # every weight finite
    forward = validation(model, criteria, inputs)
    error = raised(forward)
    assert "numel() == 0" in str(error)  # Coqui's spline on an empty selection, as in the looping run
    why = judge_blowup(model, forward, reference_norms=reference, norm_factor=10.0, recent_outliers=[])
    assert why is not None and "duration_predictor" in why and "1e+10x" in why
    # Without the size rule the re-run forward still finds where the values overflowed.
    why = judge_blowup(model, forward, reference_norms=reference, norm_factor=1e30, recent_outliers=[])
    assert why.startswith("non-finite output of duration_predictor")


def test_a_bad_batch_shape_is_a_bug_even_right_after_a_checkpoint(vits):
    model, criteria, inputs, pristine = vits
    model.load_state_dict(pristine)
    reference = module_norms(model)
    bad = {**inputs, "spec": inputs["spec"][:, :-1]}  # a spectrogram one frequency bin short
    forward = validation(model, criteria, bad)
    raised(forward)
    assert judge_blowup(model, forward, reference_norms=reference, norm_factor=10.0, recent_outliers=[]) is None


def test_outlier_losses_just_before_make_it_instability(vits):
    model, criteria, inputs, pristine = vits
    model.load_state_dict(pristine)
    reference = module_norms(model)
    scaled_duration_predictor(model, pristine, 3.0)  # grown, but within the factor
    assert largest_norm_jump(module_norms(model), reference) == ("duration_predictor", pytest.approx(3.0, rel=1e-4))
    outliers = ["step 9: loss_1 3018 > 155.6"]
    why = judge_blowup(model, validation(model, criteria, inputs), reference_norms=reference, norm_factor=10.0,
                       recent_outliers=outliers)
    assert why == "outlier losses just before it (step 9: loss_1 3018 > 155.6)"


def test_non_finite_parameters_are_instability(vits):
    model, criteria, inputs, pristine = vits
    model.load_state_dict(pristine)
    reference = module_norms(model)
    with torch.no_grad():
        next(model.waveform_decoder.parameters())[0].fill_(float("nan"))
    why = judge_blowup(model, validation(model, criteria, inputs), reference_norms=reference, norm_factor=10.0,
                       recent_outliers=[])
    assert why.startswith("non-finite parameters (waveform_decoder.")
    model.load_state_dict(pristine)
