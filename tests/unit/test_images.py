"""Dynamic tiling: grid choice table, tile counts, thumbnails, safe loading, frame sampling."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mpo.data.images import (
    MediaError,
    candidate_grids,
    choose_grid,
    frame_indices,
    open_image,
    resolve_media_path,
    tile_budget,
    tile_image,
    tiles_to_tensor,
)

# (width, height, max_num) -> (cols, rows), worked out by hand from the algorithm: the grid with
# the closest cols/rows ratio; on equal ratio the larger grid wins only if the image covers more
# than half of it.
GRID_TABLE = [
    ((448, 448, 12), (1, 1)),  # square, 200k px: ties 2x2 (needs > 401k px) and 3x3 stay out
    ((1000, 1000, 12), (3, 3)),  # square, 1e6 px: 2x2 (> 401k) then 3x3 (> 903k) win the ties
    ((896, 448, 12), (2, 1)),  # 2:1 exactly; the 4x2 tie needs > 802k px (has 401k)
    ((448, 896, 12), (1, 2)),
    ((1344, 448, 12), (3, 1)),
    ((100, 1000, 12), (1, 10)),  # ratio 0.1: 1x10 exact
    ((4000, 100, 12), (12, 1)),  # ratio 40: the widest grid allowed
    ((560, 448, 12), (4, 3)),  # ratio 1.25: 4/3 (diff .083) beats 1/1 (.25) and 3/2 (.25)
    ((560, 448, 6), (1, 1)),  # max 6: 1/1 and 3/2 tie at .25; 3x2 needs > 602k px (has 251k)
    ((1344, 896, 12), (3, 2)),  # 1.5 exact
    ((1344, 896, 4), (2, 2)),  # max 4: 1/1, 2/1 and 2/2 tie at .5; 1.2M px beats 200k then 401k -> 2x2
    ((300, 200, 4), (1, 1)),  # same ratio, 60k px: no tie is won, 1x1 stays
]


def test_grid_choice_table():
    for (w, h, m), expected in GRID_TABLE:
        assert choose_grid(w, h, max_num=m) == expected, (w, h, m)


def test_candidate_grids_cover_all_products():
    grids = candidate_grids(12)
    assert all(1 <= c * r <= 12 for c, r in grids)
    assert len(grids) == len(set(grids)) == sum(1 for c in range(1, 13) for r in range(1, 13) if c * r <= 12)
    products = [c * r for c, r in grids]
    assert products == sorted(products)
    with pytest.raises(ValueError):
        candidate_grids(0)


@pytest.mark.parametrize("size,max_num", [((448, 448), 12), ((900, 450), 12), ((1000, 800), 12), ((50, 700), 6), ((3000, 2000), 1)])
def test_tile_count_and_image_tokens(size, max_num, tiny_model_dir):
    """tiles = cols*rows (+1 thumbnail when > 1), and tiles*256 equals the image tokens in the text."""
    from mpo.data.template import ChatTemplate, place_image_placeholders
    from mpo.model.load import load_processor

    img = Image.new("RGB", size, (10, 200, 10))
    cols, rows = choose_grid(*size, max_num=max_num)
    tiles = tile_image(img, max_num=max_num)
    assert len(tiles) == cols * rows + (1 if cols * rows > 1 else 0)
    assert all(t.size == (448, 448) for t in tiles)
    pixels = tiles_to_tensor(tiles)
    assert pixels.shape == (len(tiles), 3, 448, 448)
    template = ChatTemplate(load_processor(tiny_model_dir).tokenizer, tokens_per_tile=256)
    ids = template.prompt_ids(place_image_placeholders("What is it?", 1), [len(tiles)])
    assert ids.count(template.img_context_id) == len(tiles) * 256


def test_tiles_normalised_with_imagenet_stats():
    red = tiles_to_tensor([Image.new("RGB", (448, 448), (255, 0, 0))])
    assert torch.allclose(red[0, 0], torch.full((448, 448), (1 - 0.485) / 0.229), atol=1e-5)
    assert torch.allclose(red[0, 2], torch.full((448, 448), (0 - 0.406) / 0.225), atol=1e-5)


def test_tile_budget_split():
    assert tile_budget(12, 1) == 12
    assert tile_budget(12, 5) == 2
    assert tile_budget(12, 20) == 1


def test_bad_media(tmp_path):
    with pytest.raises(MediaError) as err:
        open_image(tmp_path / "nope.png")
    assert err.value.reason == "missing_image"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(MediaError) as err:
        open_image(bad)
    assert err.value.reason == "corrupt_image"
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    with pytest.raises(MediaError) as err:
        open_image(big, max_pixels=10_000)
    assert err.value.reason == "image_too_large"
    with pytest.raises(MediaError) as err:
        resolve_media_path(tmp_path / "root", "../secret.png")
    assert err.value.reason == "path_escapes_root"
    with pytest.raises(MediaError):
        resolve_media_path(tmp_path, "/etc/passwd")
    assert resolve_media_path(tmp_path, "a/b.png") == (tmp_path / "a/b.png").resolve()


def test_frame_indices_uniform():
    assert frame_indices(80, 8) == [5, 15, 25, 35, 45, 55, 65, 75]
    assert frame_indices(3, 8) == [0, 1, 2]
    with pytest.raises(MediaError):
        frame_indices(0, 8)


def test_video_frames_one_tile_each(tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    from mpo.data.images import load_video_frames

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    visual = load_video_frames(path, num_segments=4, tile_size=56)
    assert visual.is_video and visual.tiles_per_part == [1, 1, 1, 1]
    assert visual.pixel_values.shape == (4, 3, 56, 56)
    # frames are brighter later: sampled in order
    means = visual.pixel_values.mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])


def test_tiles_to_tensor_matches_the_plain_formula_bit_for_bit():
    """Twin of the fast conversion: ((x / 255) - mean) / std on a channels-last fp32 array."""
    import numpy as np
    import torch

    from mpo.data.images import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)) for _ in range(3)]
    tiles.append(Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)))  # greyscale: converted to RGB
    plain = np.stack([np.asarray(t.convert("RGB"), dtype=np.float32) / 255.0 for t in tiles])
    expected = (torch.from_numpy(plain).permute(0, 3, 1, 2) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = tiles_to_tensor(tiles)
    assert pixels.dtype == torch.float32 and pixels.shape == (4, 3, 37, 53) and pixels.is_contiguous()
    assert torch.equal(pixels, expected)
