"""EoMT inference against transformers' ``EomtImageProcessor`` (tests/oracles/eomt_oracle.py in the oracle
environment): sliding-window semantic inference (``do_split_image``) end to end on landscape, portrait and square
images, and the panoptic / instance post-processing on the same logits."""
import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, run_oracle
from PIL import Image

from modelscope_plugin.inference.postprocess import instance_inference, panoptic_inference, window_semantic_evidence
from modelscope_plugin.inference.predictor import Predictor
from modelscope_plugin.inference.preprocess import load_image, prepare_windows, rescaled_size, window_starts
from modelscope_plugin.model_dirs.load import load_model

pytestmark = pytest.mark.oracle

# a 7-class (semantic) EoMT at a 64x64 input, masks already annealed away (a trained checkpoint)
SMALL = ["--hidden-size", "64", "--layers", "4", "--heads", "4", "--image-size", "64", "--registers", "2",
         "--num-blocks", "2", "--queries", "12", "--labels", "7", "--seed", "0", "--attn-mask-probs", "0,0"]


def test_an_extremely_elongated_image_is_refused_for_windows():
    from modelscope_plugin.config import EomtConfig
    from modelscope_plugin.errors import ImageInputError

    config = EomtConfig(image_size=64)
    banner = np.zeros((2, 100, 3), dtype=np.uint8)  # 50 windows
    with pytest.raises(ImageInputError, match="100x2 pixels is too elongated"):
        prepare_windows(banner, config.preprocess, 64)
    assert len(prepare_windows(np.zeros((2, 64, 3), dtype=np.uint8), config.preprocess, 64).window_starts) == 32


def test_window_starts_by_hand():
    # 100 pixels in windows of 64: two, overlapping by 28, the second ending at 100
    assert window_starts(100, 64) == (0, 36)
    # 150 pixels: three windows, 42 pixels of overlap in all, 21 each: starts 0, 43, 86
    assert window_starts(150, 64) == (0, 43, 86)
    # 85 pixels: two windows overlapping by 43 -> the second starts at 21 and ends at 85
    assert window_starts(85, 64) == (0, 21)
    assert window_starts(64, 64) == (0,)
    # 129 pixels: three windows, overlap 63 / 2 = 31.5 each: starts 0, int(32.5) = 32, 65
    assert window_starts(129, 64) == (0, 32, 65)


@pytest.fixture(scope="module")
def windowed_case(tmp_path_factory):
    """A small semantic EoMT folder, images of three shapes, and transformers' split-image results for them."""
    directory = tmp_path_factory.mktemp("eomt_windows")
    model_dir = directory / "hf_eomt"
    run_oracle("eomt_oracle.py", "make", *SMALL, "--out-dir", model_dir)
    landscape = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"
    portrait = directory / "portrait.png"
    Image.open(SHARED_DATA / "photos" / "coffee.png").convert("RGB").transpose(Image.Transpose.TRANSPOSE).save(portrait)
    images = [landscape, portrait, SHARED_DATA / "photos" / "chelsea.png", SHARED_DATA / "photos" / "astronaut.png"]
    run_oracle("eomt_oracle.py", "windows", "--model-dir", model_dir, "--images", *images,
               "--result", directory / "windows.npz")
    return model_dir, images, dict(np.load(directory / "windows.npz"))


def test_windows_equal_the_processors_split_images(windowed_case):
    model_dir, images, reference = windowed_case
    config, network = load_model(model_dir)
    assert config.task == "semantic" and config.semantic_windows
    for index, path in enumerate(images):
        prepared = prepare_windows(load_image(str(path)), config.preprocess, config.image_size)
        theirs = torch.from_numpy(reference[f"pixel_values_{index}"])
        ours = prepared.network_input()
        assert ours.shape == theirs.shape, path.name
        if path.name == "astronaut.png":  # square: one window
            assert ours.shape[0] == 1
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=path.name)
        offsets = reference[f"patch_offsets_{index}"]
        assert list(prepared.window_starts) == offsets[:, 1].tolist(), path.name
        assert (offsets[:, 2] - offsets[:, 1] == 64).all()
    assert sum(reference[f"pixel_values_{index}"].shape[0] > 1 for index in range(len(images))) == 3


def test_window_evidence_equals_post_process_semantic_segmentation(windowed_case):
    """The merge alone, on transformers' own logits: the per-class scores at the original size."""
    model_dir, images, reference = windowed_case
    config, _ = load_model(model_dir)
    for index, path in enumerate(images):
        rgb = load_image(str(path))
        prepared = prepare_windows(rgb, config.preprocess, config.image_size)
        evidence = window_semantic_evidence(
            torch.from_numpy(reference[f"class_queries_logits_{index}"]),
            torch.from_numpy(reference[f"masks_queries_logits_{index}"]), prepared.window_starts,
            prepared.resized_size, rgb.shape[:2])
        theirs = torch.from_numpy(reference[f"segmentation_scores_{index}"])
        assert evidence.shape == theirs.shape == (7, *rgb.shape[:2]), path.name
        # evidence lies in [0, number of queries]; here it spreads over about [0, 5]
        assert theirs.max() > 1.0 and theirs.std() > 0.1
        torch.testing.assert_close(evidence, theirs, rtol=0, atol=1e-5 * float(theirs.max()), msg=path.name)


def test_predictor_semantic_windows_match_transformers_end_to_end(windowed_case):
    """Image -> Predictor (windows, our network, merge) -> class map equals transformers' map wherever its best
    class leads the second by more than float rounding; the network's window logits agree too."""
    model_dir, images, reference = windowed_case
    config, network = load_model(model_dir)
    predictor = Predictor(network, config)
    for index, path in enumerate(images):
        prepared = predictor.prepare(str(path), "semantic")
        with torch.no_grad():
            output = network(prepared.network_input())
        theirs = torch.from_numpy(reference[f"masks_queries_logits_{index}"])
        assert (output.mask_logits - theirs).abs().max() <= 1e-4 * theirs.abs().max(), path.name
        result = predictor(str(path), task="semantic")
        class_map = torch.as_tensor(result["sem_seg"]).long()
        scores = torch.from_numpy(reference[f"segmentation_scores_{index}"])
        top2 = scores.topk(2, dim=0).values
        decided = (top2[0] - top2[1]) > 1e-4
        their_map = torch.from_numpy(reference[f"segmentation_{index}"])
        assert decided.float().mean() > 0.99, path.name
        assert torch.equal(class_map[decided], their_map[decided]), path.name
        # several classes present: the comparison can fail
        assert len(torch.unique(their_map)) >= 2, path.name


def test_pipeline_runs_windows_only_for_the_semantic_task(windowed_case, monkeypatch):
    model_dir, images, _ = windowed_case
    config, network = load_model(model_dir)
    predictor = Predictor(network, config)
    assert predictor.uses_windows("semantic") and not predictor.uses_windows("panoptic")
    assert predictor.prepare(str(images[0]), "panoptic").padded_size == (64, 64)
    assert len(predictor.prepare(str(images[0]), "semantic").window_starts) > 1
    # a list in one batch (each image's windows run together) equals the images one at a time
    parameters = predictor.parameters(task="semantic")
    together = predictor.predict_list([str(path) for path in images[:3]], parameters, batch_size=3)
    for path, result in zip(images[:3], together):
        alone = predictor(str(path), task="semantic")
        assert np.array_equal(result["sem_seg"], alone["sem_seg"]) and result["labels"] == alone["labels"]
    # and ModelScope's pipeline() runs the windows for the semantic task
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    (model_dir / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "model": {"type": "eomt"},
        "pipeline": {"type": "image-panoptic-segmentation"}}))
    try:
        segmenter = pipeline(Tasks.image_segmentation, model=str(model_dir), device="cpu")
        assert np.array_equal(segmenter(str(images[1]))["sem_seg"], predictor(str(images[1]))["sem_seg"])
        assert segmenter(str(images[1]), task="panoptic")["masks"]
    finally:
        (model_dir / "configuration.json").unlink()
    # preprocessor_config.json decides when the folder has one
    (model_dir / "preprocessor_config.json").write_text(json.dumps({"do_split_image": False}))
    try:
        config, _ = load_model(model_dir)
        assert not config.semantic_windows
        (model_dir / "preprocessor_config.json").write_text(json.dumps({"do_split_image": "yes"}))
        from modelscope_plugin.errors import CheckpointError

        with pytest.raises(CheckpointError, match="do_split_image"):
            load_model(model_dir)
    finally:
        (model_dir / "preprocessor_config.json").unlink()


def smooth_mask_logits(generator, queries, size):
    """(Q, size, size) logits of blobs: a coarse 3x3 random field per query, upsampled, offset negative."""
    coarse = torch.randn(queries, 1, 3, 3, generator=generator) * 6 - 2
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_panoptic_and_instance_postprocessing_match_transformers(tmp_path, seed):
    """``panoptic_inference`` (filter_low_score, stuff classes merged) and ``instance_inference`` (one class per
    query reaches the 0.5 threshold, so the top-k over (query, class) pairs keeps exactly transformers' per-query
    argmax) against ``EomtImageProcessor.post_process_*`` on the same random logits of a 64x64 input. The overlap
    threshold is 0.3: random blobs overlap too much for 0.8 to keep a segment."""
    generator = torch.Generator().manual_seed(seed)
    num_queries, num_classes, num_things, image_size = 12, 7, 4, 64
    class_logits = torch.randn(num_queries, num_classes + 1, generator=generator) * 4
    mask_logits = smooth_mask_logits(generator, num_queries, image_size // 4)
    original_size = (37 + 10 * seed, 61)
    resized_size = rescaled_size(*original_size, image_size, image_size)
    np.savez(tmp_path / "logits.npz", class_queries_logits=class_logits[None].numpy(),
             masks_queries_logits=mask_logits[None].numpy(), target_size=np.array(original_size))
    run_oracle("eomt_oracle.py", "postprocess", "--logits", tmp_path / "logits.npz", "--size", image_size,
               "--num-things", num_things, "--threshold", 0.5, "--overlap", 0.3, "--instance-threshold", 0.5,
               "--result", tmp_path / "result.npz")
    reference = np.load(tmp_path / "result.npz")
    sizes = dict(padded_size=(image_size, image_size), resized_size=resized_size, original_size=original_size)

    ours = panoptic_inference(class_logits, mask_logits, num_things, **sizes, object_mask_threshold=0.5,
                              overlap_threshold=0.3, filter_low_score=True).segments
    their_map = torch.from_numpy(reference["panoptic_segmentation"]).long()
    their_segments = json.loads(str(reference["panoptic_segments"]))
    assert len(their_segments) >= 3 and any(s["label_id"] < num_things for s in their_segments)
    assert sorted(s.label for s in ours) == sorted(s["label_id"] for s in their_segments)
    our_map = torch.full(original_size, -1, dtype=torch.long)
    for segment in ours:
        our_map[segment.mask] = segment.label
    label_map = torch.full(original_size, -1, dtype=torch.long)
    for segment in their_segments:
        label_map[their_map == segment["id"]] = segment["label_id"]
    assert torch.equal(our_map, label_map)
    for segment in their_segments:
        mask = their_map == segment["id"]
        match = [s for s in ours if s.label == segment["label_id"] and torch.equal(s.mask, mask)]
        assert len(match) == 1, segment
        if segment["label_id"] < num_things:  # stuff: transformers keeps the first query's score, ours the highest
            assert abs(match[0].score - segment["score"]) <= 1e-6

    ours = instance_inference(class_logits, mask_logits, num_classes, **sizes,
                              max_per_image=num_queries * num_classes, mask_from_probability=False,
                              score_threshold=0.5)
    their_map = torch.from_numpy(reference["instance_segmentation"]).long()
    their_segments = json.loads(str(reference["instance_segments"]))
    assert len(their_segments) >= 2
    assert len(ours) == len(their_segments)
    for segment in their_segments:
        match = [s for s in ours if s.label == segment["label_id"] and abs(s.score - segment["score"]) <= 1e-6]
        assert len(match) == 1, segment
        # the map shows each instance where no later one overwrote it
        assert bool(match[0].mask[their_map == segment["id"]].all())
