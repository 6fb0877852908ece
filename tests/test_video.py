"""Video in (palikit.video): clips written by PyAV here (palikit.synthetic.make_clip: a scene whose
shapes slide, frame k marked by k white pixels along its top edge, so the test reads which frame
it got), sampled as big_vision samples them, as several images before one prompt, through the
API, the CLI, `palikit run` and the server."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import palikit
from palikit import video
from palikit.processor import encode_example, preprocess
from palikit.synthetic import make_clip

from .conftest import hf_greedy

pytest.importorskip("av", reason="video needs PyAV (palikit[video])")


def frame_number(image) -> int:
    """The number make_clip painted on a frame: its white pixels along the top edge."""
    return int((np.asarray(image.convert("RGB"))[1] > 200).all(-1).sum())


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mov", ".gif"])
def test_frames_are_sampled_as_big_vision_samples_them(tmp_path, suffix):
    """Evaluation's rule (big_vision's video transfers: 16 frames at a stride of 9 from the first
    frame, a short clip's frames repeated in order, video_replicate_img): the chosen indices, the
    frames decoded being those frames, and their times."""
    path = tmp_path / f"clip{suffix}"
    make_clip(path, frames=40, fps=10)
    clip = video.read_video(path)  # 16 frames, stride 9: 0, 9, 18, 27, 36 fit in 40; repeated in order
    want = ([0, 9, 18, 27, 36] * 4)[:16]
    assert clip.indices == want and clip.total == 40
    assert [frame_number(f) for f in clip.frames] == want
    assert clip.times == pytest.approx([i / 10 for i in want])
    assert video.read_video(path, frames=2, stride=3).indices == [0, 3]  # from the first frame, not the centre
    uniform = video.read_video(path, frames=5, stride=None)
    assert uniform.indices == [0, 10, 20, 29, 39] == [frame_number(f) for f in uniform.frames]


def test_sampling_rules():
    assert video.strided_indices(200) == list(range(0, 144, 9))  # a long clip: 16 frames from the first
    assert video.strided_indices(200, 4, 9, offset=7) == [7, 16, 25, 34]
    assert video.strided_indices(3, 4, 2) == [0, 2, 0, 2]
    assert video.strided_indices(1) == [0] * 16
    assert video.uniform_indices(100, 3) == [0, 50, 99]
    # training's offset: uniform over those where all frames fit (DMVR), 0 for a short clip
    offsets = {video.random_offset(200, 16, 9, __import__("random").Random(s)) for s in range(200)}
    assert offsets <= set(range(200 - 15 * 9)) and len(offsets) > 20
    assert video.random_offset(100, 16, 9) == 0
    with pytest.raises(palikit.InputError, match="no frames"):
        video.strided_indices(0)


def test_only_the_chosen_frames_are_converted(tmp_path, monkeypatch):
    """Frames are decoded one at a time and only the chosen ones become images: memory holds those,
    never the clip; decoding stops after the last chosen one."""
    import av

    path = tmp_path / "c.mp4"
    make_clip(path, frames=60)
    converted = []
    to_image = av.VideoFrame.to_image
    monkeypatch.setattr(av.VideoFrame, "to_image", lambda self, *a, **k: converted.append(1) or to_image(self, *a, **k))
    clip = video.read_video(path, frames=4, stride=5, size=32)
    assert len(converted) == 4 and clip.indices == [0, 5, 10, 15]
    assert all(f.size == (32, 32) for f in clip.frames) and clip.size == (96, 96)


def test_a_video_prompt_is_its_frames_as_several_images(hf_pair, tmp_path):
    """A clip's prompt gives the logits and greedy tokens transformers gives the same frames as
    several images (PaliGemma 1 and 2), and the frame times come with the answer."""
    _, hf, folder = hf_pair
    pipe = palikit.load(folder, dtype="float32", sliding_window=True)
    path = tmp_path / "c.webm"
    make_clip(path, frames=30, size=48)
    clip = video.read_video(path, frames=3, stride=7, size=pipe.config.vision.image_size, resample=pipe.config.resample)
    assert clip.indices == [0, 7, 14]
    n, prompt = pipe.config.num_image_tokens, "caption en"
    ids = torch.tensor([encode_example(pipe.tokenizer, 3 * n, prompt).ids])
    pixels = preprocess(clip.frames, pipe.config.vision.image_size, pipe.config.resample)
    want_tokens, logits = hf_greedy(hf, ids, pixels, max_new_tokens=6)
    (_, got), = pipe.generate_details([path], [prompt], frames=3, stride=7, max_new_tokens=6)
    assert got.tokens == want_tokens and got.frame_times == pytest.approx(clip.times)
    want = [float(step[0].float().log_softmax(-1)[t]) for step, t in zip(logits, got.tokens)]
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want), atol=1e-4, rtol=0)
    other = pipe.generate_details([path], [prompt], frames=3, stride=2, max_new_tokens=6)[0][1]
    assert other.logprobs != got.logprobs, "other frames, another answer"


def test_bad_videos_are_one_line(tmp_path, capsys):
    """Not a video, no frames, frames too large, an over-long prompt (refused before decoding): one
    line from the CLI (exit 2) and from the API."""
    import av

    from palikit.cli import main

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as out:  # a header and no frame
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        out.start_encoding()
    audio = tmp_path / "sound.mkv"
    with av.open(str(audio), "w") as out:
        out.add_stream("pcm_s16le", rate=8000)
        out.start_encoding()
    long = tmp_path / "long.mp4"
    make_clip(long, frames=20)
    cases = [(junk, "not a video PyAV can read"), (empty, "no video stream|no frames"),
             (audio, "not a video PyAV can read|no video stream"),
             (tmp_path / "gone.mp4", "video file not found")]
    for path, message in cases:
        with pytest.raises(palikit.InputError, match=message):
            video.read_video(path)
        assert main(["caption", str(path), "--frames", "2"]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, err
    with pytest.raises(palikit.InputError, match="over the limit"):
        video.read_video(long, max_pixels=1000)
    assert main(["caption", str(long), "--frames", "64"]) == 2  # 64 x 144 image tokens > 4096
    assert "more than the model's limit of 4096" in capsys.readouterr().err


def test_the_cli_and_run_take_clips(tmp_path, capsys):
    """`palikit caption clip.mp4 --frames 16` on the bundled model (which knows only shapes: its
    answer about 16 frames of a moving scene is its own), its --json with the frame times, and
    `palikit run` jobs with "video"."""
    from palikit.cli import main

    path = tmp_path / "clip.mp4"
    make_clip(path, frames=160)
    assert main(["caption", str(path), "--frames", "16", "--json", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] and out["frame_times"] == pytest.approx([i * 0.9 for i in range(16)])
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"video": "clip.mp4", "prompt": "caption en", "frames": 2, "stride": 3,
                                "max_new_tokens": 4}) + "\n"
                    + json.dumps({"video": "clip.mp4", "image": "x.png", "prompt": "caption en"}) + "\n")
    assert main(["run", "--input", str(jobs), "--output", str(tmp_path / "out.jsonl")]) == 0
    first, second = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    pipe = palikit.load("default")
    assert first["text"] == pipe.generate(str(path), "caption en", frames=2, stride=3, max_new_tokens=4)
    assert first["frame_times"] == pytest.approx([0.0, 0.3]) and "not both" in second["error"]


def test_the_server_answers_a_video_beside_image_requests(tmp_path):
    """A clip as a data URL on a native endpoint and as a chat video_url part, while image requests
    run; the frames go through the image cache (a second question on the clip encodes nothing);
    a bad clip is a 400 and a too-long one is refused before decoding."""
    import httpx

    from palikit.serve import background, create_app

    from .conftest import synthetic_image
    from .test_serve import chat_body, data_url

    path = tmp_path / "clip.mp4"
    make_clip(path, frames=30)
    clip = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    pipe = palikit.load("default", dtype="float32")
    want = pipe.generate(str(path), "caption en", frames=3, max_new_tokens=5)
    app = create_app(pipe)

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            images = [c.post("/v1/caption", json={"image": data_url(synthetic_image(s)), "max_new_tokens": 8})
                      for s in range(3)]
            clip_body = {"video": clip, "frames": 3, "max_new_tokens": 5}
            done = await asyncio.gather(c.post("/v1/caption", json=clip_body), *images)
            encoded = app.state.palikit.batcher.engine.runner.images.misses
            body = chat_body(data_url(synthetic_image(0)), "caption en", max_tokens=5)
            body["messages"][0]["content"][0] = {"type": "video_url", "video_url": {"url": clip, "frames": 3}}
            chat = await c.post("/v1/chat/completions", json=body)
            again = app.state.palikit.batcher.engine.runner.images.misses
            junk = "data:video/mp4;base64," + base64.b64encode(b"not a video" * 50).decode()
            bad = await c.post("/v1/caption", json={"video": junk, "frames": 2})
            long = await c.post("/v1/caption", json={"video": clip, "frames": 16})
            return done, chat, again - encoded, bad, long

    with background(app) as url:
        done, chat, new_encodings, bad, long = asyncio.run(fire(url))
    assert [r.status_code for r in done] == [200] * 4
    assert done[0].json()["text"] == want and done[0].json()["frame_times"] == pytest.approx([0.0, 0.9, 1.8])
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == want
    assert new_encodings == 0, "the clip's frames come from the image cache the second time"
    assert bad.status_code == 400 and "video" in bad.json()["error"]["message"]
    assert long.status_code == 400 and "--max-len" in long.json()["error"]["message"]


def _layouts(root):
    """Tiny files in each video benchmark's published layout, two clips each -> {benchmark: folder}."""
    out = {}

    def clips(folder, names):
        folder.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            make_clip(folder / name, seed=i, frames=30)

    d = out["msrvtt_cap"] = root / "msrvtt"
    clips(d / "TestVideo", ["video7010.mp4", "video7011.mp4"])
    (d / "test_videodatainfo.json").write_text(json.dumps({
        "videos": [{"video_id": "video7010", "split": "test"}, {"video_id": "video7011", "split": "test"}],
        "sentences": [{"video_id": "video7010", "caption": "a red circle"}, {"video_id": "video7011", "caption": "shapes"},
                      {"video_id": "video7010", "caption": "a circle moves"}]}))
    d = out["msrvtt_qa"] = root / "msrvtt_qa"
    clips(d / "video", ["video7010.mp4", "video7011.mp4"])
    (d / "test_qa.json").write_text(json.dumps([{"question": "what moves?", "answer": "circle", "video_id": 7010, "id": 1},
                                                {"question": "how many?", "answer": "two", "video_id": 7011, "id": 2}]))
    d = out["msvd_qa"] = root / "msvd"
    d.mkdir()
    (d / "YouTubeClips").mkdir()
    make_clip(d / "YouTubeClips" / "abc_1_5.mkv", frames=30)  # MSVD ships .avi; any container PyAV reads
    (d / "YouTubeClips" / "abc_1_5.mkv").rename(d / "YouTubeClips" / "abc_1_5.avi")
    (d / "youtube_mapping.txt").write_text("abc_1_5 vid1\n")
    (d / "test_qa.json").write_text(json.dumps([{"question": "what is it?", "answer": "circle", "video_id": 1, "id": 0}]))
    d = out["activitynet_qa"] = root / "anet_qa"
    clips(d / "videos", ["v_xyz.mp4"])
    (d / "test_q.json").write_text(json.dumps([{"question": "is it red", "question_id": "xyz_0", "video_name": "xyz"}]))
    (d / "test_a.json").write_text(json.dumps([{"answer": "yes", "question_id": "xyz_0", "type": 3}]))
    d = out["activitynet_cap"] = root / "anet_cap"
    clips(d / "videos", ["v_xyz.mp4"])
    (d / "val_1.json").write_text(json.dumps({"v_xyz": {"duration": 3.0, "timestamps": [[0.0, 1.0], [1.5, 3.0]],
                                                        "sentences": ["A circle. ", "It moves."]}}))
    d = out["vatex_cap"] = root / "vatex"
    clips(d / "videos", ["Ab_000001_000011.mp4"])
    (d / "vatex_validation_v1.0.json").write_text(json.dumps([{"videoID": "Ab_000001_000011",
                                                               "enCap": ["a circle", "shapes move"], "chCap": []}]))
    return out


def test_video_benchmarks_read_their_published_layouts(tmp_path):
    """Each video benchmark read from tiny files in its published layout: big_vision's prompt, the
    references, 16 frames at a stride of 9 (ActivityNet Captions: of each captioned segment)."""
    from palikit.eval_sets import read_benchmark

    folders = _layouts(tmp_path)
    got = {name: read_benchmark(name, folder) for name, folder in folders.items()}
    assert [(e.id, e.prefix, e.answers) for e in got["msrvtt_cap"]] == [
        ("video7010", "caption en", ["a red circle", "a circle moves"]), ("video7011", "caption en", ["shapes"])]
    assert [(e.prefix, e.answers, Path(e.image).name) for e in got["msrvtt_qa"]] == [
        ("answer en what moves?", ["circle"], "video7010.mp4"), ("answer en how many?", ["two"], "video7011.mp4")]
    assert Path(got["msvd_qa"][0].image).name == "abc_1_5.avi" and got["msvd_qa"][0].answers == ["circle"]
    assert (got["activitynet_qa"][0].prefix, got["activitynet_qa"][0].answers) == ("answer en is it red", ["yes"])
    cap = got["activitynet_cap"]
    assert [(e.id, e.answers, e.extra["clip"]) for e in cap] == [
        ("v_xyz[0.0-1.0]", ["A circle."], [0.0, 1.0]), ("v_xyz[1.5-3.0]", ["It moves."], [1.5, 3.0])]
    assert got["vatex_cap"][0].answers == ["a circle", "shapes move"]
    assert all(e.extra["video"] == {"frames": 16, "stride": 9} for es in got.values() for e in es)
    segment = video.read_video(cap[1].image, frames=4, stride=2, clip=cap[1].extra["clip"])
    assert segment.indices == [15, 17, 19, 21] and [frame_number(f) for f in segment.frames] == segment.indices


def test_palikit_eval_scores_a_video_benchmark(tmp_path):
    """`palikit eval --benchmark msrvtt_qa` end to end on the bundled model: every example answered
    from its 16 frames, scored by the QA accuracy, the report written."""
    from palikit.cli import main

    folders = _layouts(tmp_path)
    out = tmp_path / "preds.jsonl"
    assert main(["eval", "--benchmark", "msrvtt_qa", "--data", str(folders["msrvtt_qa"]), "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["examples"] == 2 and report["errors"] == 0
    assert [r["metric"] for r in report["results"]] == ["vqa_accuracy"]


def test_fine_tuning_reads_clips(tmp_path, tokenizer_file):
    """A training line may carry "video" (+ frames, stride): its prompt holds that many frames,
    sampled as big_vision's training samples them (a random first frame, the same for the same
    example so a resumed run reads what it read), and a run trains on it."""
    from palikit.data import PaliGemmaDataset, check_dataset, load_examples
    from palikit.finetune import train
    from palikit.processor import Tokenizer

    make_clip(tmp_path / "clip.mp4", frames=60)
    lines = [{"video": "clip.mp4", "frames": 3, "stride": 5, "prefix": "caption en", "suffix": "a moving circle"},
             {"video": "clip.mp4", "frames": 2, "prefix": "answer en what moves?", "suffix": "a circle"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    examples = load_examples(tmp_path / "train.jsonl")
    assert [e.n_images for e in examples] == [3, 2] and examples[0].video == {"frames": 3, "stride": 5}
    tok = Tokenizer(tokenizer_file, image_token_id=1552)
    ds = PaliGemmaDataset(examples, tok, num_image_tokens=4)
    first, again = ds[0], ds[0]
    numbers = [frame_number(f) for f in first.images]
    assert len(first.images) == 3 and numbers == [frame_number(f) for f in again.images]
    assert numbers[1] - numbers[0] == 5 and 0 <= numbers[0] < 60 - 2 * 5
    assert first.encoded.ids.count(1552) == 3 * 4
    assert check_dataset(tmp_path / "train.jsonl").ok
    cfg = {"model": {"preset": "tiny-paligemma2", "tokenizer": str(tokenizer_file)}, "train_file": str(tmp_path / "train.jsonl"),
           "out_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 0, "max_text_len": 32}
    assert train(cfg)["step"] == 2
