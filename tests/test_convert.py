"""Tests of vgg_jax.convert against the real torchvision and Keras layouts.

The nets are the real layouts at a small size (width 1/8, fc_width 64, 64x64 photos,
so fc6 sees a 2x2 map and the NCHW -> HWC reordering matters): torchvision's module
sequence is rebuilt here from torchvision's own `cfgs` literal, Keras files are written
by h5py in the Keras 2 layout and, when Keras is installed, by Keras itself.
"""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import checkpointing
from vgg_jax import convert
from vgg_jax import models

WIDTH, FC_WIDTH, NUM_CLASSES, SIZE = 1 / 8, 64, 10, 64

# The layer lists of torchvision's VGG (its layout, which the converter must match).
TORCHVISION_CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512,
          512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


def real_images(n=4, size=SIZE):
  """RGB 0..255 float32 [n, size, size, 3]: crops of a photo matplotlib ships, or
  Fashion-MNIST test images replicated to RGB when it is missing."""
  from PIL import Image
  try:
    from matplotlib import cbook
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    photo = photo.convert("RGB")
    w, h = photo.size
    boxes = [(0, 0, w, h), (0, 0, w // 2, h // 2), (w // 4, h // 4, 3 * w // 4, h),
             (w // 3, 0, w, 2 * h // 3)]
    crops = [photo.crop(b).resize((size, size), Image.BILINEAR) for b in boxes[:n]]
  except (ImportError, FileNotFoundError, ValueError):
    path = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
    if not os.path.exists(path):
      pytest.skip("No real photos: neither matplotlib's sample data nor Fashion-MNIST.")
    with gzip.open(path) as f:
      gray = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    crops = [Image.fromarray(g).convert("RGB").resize((size, size)) for g in gray]
  return np.stack([np.asarray(c, np.float32) for c in crops])


def apply_ours(meta, params, images_rgb_0_255):
  model = models.create_model(meta["model"], num_classes=meta["num_classes"],
                              width=meta["width"], fc_width=meta["fc_width"])
  x = convert.apply_input_convention(images_rgb_0_255, convert.input_convention(meta))
  return np.asarray(model.apply({"params": params}, jnp.asarray(x), train=False))


def assert_logits_close(ours, reference):
  """1e-4 relative to the logits' scale."""
  scale = np.abs(reference).max()
  assert scale > 1e-3, "degenerate reference logits"
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------- fc6 reordering


def test_fc6_reorder_from_nchw_flatten_to_hwc_flatten():
  rng = np.random.default_rng(0)
  channels, window, out = 5, 3, 4
  feature_map = rng.normal(size=(2, window, window, channels))  # NHWC
  nchw_weight = rng.normal(size=(out, channels * window * window))  # torch Linear
  torch_out = feature_map.transpose(0, 3, 1, 2).reshape(2, -1) @ nchw_weight.T
  kernel = convert.fc6_kernel_from_nchw(nchw_weight, channels)
  assert kernel.shape == (window * window * channels, out)
  np.testing.assert_allclose(feature_map.reshape(2, -1) @ kernel, torch_out, rtol=1e-12)
  np.testing.assert_array_equal(convert.fc6_kernel_to_nchw(kernel, channels), nchw_weight)
  # Element by element: torch input (c, h, w) is our input (h, w, c).
  np.testing.assert_array_equal(kernel[(1 * window + 2) * channels + 3],
                                nchw_weight[:, 3 * window * window + 1 * window + 2])
  with pytest.raises(ValueError, match="not a square map"):
    convert.fc6_kernel_from_nchw(rng.normal(size=(out, 7 * channels)), channels)


@pytest.mark.parametrize("name,indices", [
    ("A", [0, 3, 6, 8, 11, 13, 16, 18]),
    ("D", [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]),
    ("E", [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34])])
def test_torchvision_conv_indices(name, indices):
  assert list(convert.torchvision_conv_indices(name).values()) == indices


# ------------------------------------------------------------------- torchvision


def torchvision_vgg(name, seed=0):
  """torchvision's VGG module layout (features, avgpool, classifier) at a small size."""
  torch = pytest.importorskip("torch", exc_type=ImportError, reason="PyTorch is not "
                              "importable; the torchvision-layout test needs it "
                              "(pip install torch).")
  from torch import nn
  torch.manual_seed(seed)
  layers, channels = [], 3
  for v in TORCHVISION_CFGS[name]:  # torchvision's make_layers(cfg, batch_norm=False)
    if v == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      v = int(v * WIDTH)
      layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      channels = v
  window = SIZE // 32

  class VGG(nn.Module):
    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(*layers)
      self.avgpool = nn.AdaptiveAvgPool2d((window, window))  # the identity here
      self.classifier = nn.Sequential(
          nn.Linear(channels * window * window, FC_WIDTH), nn.ReLU(True), nn.Dropout(),
          nn.Linear(FC_WIDTH, FC_WIDTH), nn.ReLU(True), nn.Dropout(),
          nn.Linear(FC_WIDTH, NUM_CLASSES))

    def forward(self, x):
      return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

  net = VGG().eval()
  with torch.no_grad():  # He-scaled weights and non-zero biases: logits of order 1
    for m in net.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(m.bias, std=0.1)
  return net


def torch_logits(net, images_rgb_0_255):
  import torch
  x = torch.from_numpy(images_rgb_0_255).permute(0, 3, 1, 2) / 255.0  # ToTensor()
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # Normalize(...)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  with torch.no_grad():
    return net((x - mean) / std).numpy()


@pytest.mark.parametrize("name", ["A", "D"])
def test_torchvision_weights_give_the_same_logits(name, tmp_path):
  net = torchvision_vgg(name)
  import torch
  pytest.importorskip("safetensors", reason="safetensors is not installed.")
  from safetensors.torch import save_file
  state = {k: v.contiguous() for k, v in net.state_dict().items()}
  save_file(state, str(tmp_path / "vgg.safetensors"))
  torch.save(state, str(tmp_path / "vgg.pth"))
  images = real_images()
  reference = torch_logits(net, images)

  params, meta = convert.convert_file("torchvision", name,
                                      str(tmp_path / "vgg.safetensors"),
                                      str(tmp_path / "out"))
  assert meta["input_convention"] == convert.TORCHVISION
  assert (meta["model"], meta["num_classes"], meta["fc_width"], meta["width"],
          meta["crop_size"]) == (name, NUM_CLASSES, FC_WIDTH, WIDTH, SIZE)
  assert_logits_close(apply_ours(meta, params, images), reference)

  # The saved checkpoint reads back with its meta, and .pth (weights_only) agrees.
  loaded, loaded_meta = checkpointing.load_params(str(tmp_path / "out"))
  assert loaded_meta["input_convention"] == convert.TORCHVISION
  assert_logits_close(apply_ours(loaded_meta, loaded, images), reference)
  from_pth = convert.convert_torchvision(convert.read_torchvision(
      str(tmp_path / "vgg.pth")), name)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, params)


def test_torchvision_refuses_batch_norm_and_the_wrong_net():
  rng = np.random.default_rng(0)
  state = {f"features.{i}.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
           for i in convert.torchvision_conv_indices("D").values()}
  with pytest.raises(ValueError, match=r"is --model right\?"):
    convert.convert_torchvision(state, "A")
  with pytest.raises(ValueError, match="batch normalisation"):
    convert.convert_torchvision(dict(state, **{"features.1.running_mean": np.zeros(8)}),
                                "D")


# ------------------------------------------------------------------------- Keras


def random_keras_layers(name, seed=0):
  """Keras layer name -> (kernel, bias) of a small VGG in Keras's shapes."""
  rng = np.random.default_rng(seed)
  layers, channels = {}, 3
  for spec in models.layer_specs(name, width=WIDTH):
    if isinstance(spec, models.ConvSpec):
      stage, index = spec.name[4:].split("_")
      fan_in = 9 * channels
      layers[f"block{stage}_conv{index}"] = (
          rng.normal(size=(3, 3, channels, spec.features)) * np.sqrt(2 / fan_in),
          rng.normal(size=spec.features) * 0.1)
      channels = spec.features
  inputs = channels * (SIZE // 32) ** 2
  for layer, (n_in, n_out) in zip(["fc1", "fc2", "predictions"],
                                  [(inputs, FC_WIDTH), (FC_WIDTH, FC_WIDTH),
                                   (FC_WIDTH, NUM_CLASSES)]):
    layers[layer] = (rng.normal(size=(n_in, n_out)) * np.sqrt(2 / n_in),
                     rng.normal(size=n_out) * 0.1)
  return {k: (w.astype(np.float32), b.astype(np.float32)) for k, (w, b) in layers.items()}


def numpy_keras_vgg(layers, images_rgb_0_255):
  """Keras's VGG16/19 forward pass in numpy: caffe preprocessing, channels-last."""
  x = images_rgb_0_255[..., ::-1] - np.array([103.939, 116.779, 123.68])  # BGR
  for stage in range(1, 6):
    for index in range(1, 5):
      if f"block{stage}_conv{index}" not in layers:
        continue
      kernel, bias = layers[f"block{stage}_conv{index}"]
      padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
      x = np.maximum(np.einsum("nhwcij,ijco->nhwo", windows, kernel) + bias, 0)
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  x = x.reshape(len(x), -1)  # Flatten, channels-last
  for layer in ("fc1", "fc2"):
    x = np.maximum(x @ layers[layer][0] + layers[layer][1], 0)
  return x @ layers["predictions"][0] + layers["predictions"][1]


def write_keras2_h5(path, layers, *, model_save=False):
  """The Keras 2 HDF5 layout: `save_weights` (layer_names attribute, one group per
  layer listing its weight_names) or, with model_save, under `model_weights/`
  of `model.save`, with optimizer state beside it."""
  import h5py
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights") if model_save else f
    names = ["input_1"] + [k for k in layers] + ["flatten"]
    root.attrs["layer_names"] = np.array([n.encode() for n in names])
    root.attrs["keras_version"] = b"2.2.4"
    root.attrs["backend"] = b"tensorflow"
    for name in names:
      group = root.create_group(name)
      if name not in layers:
        group.attrs["weight_names"] = np.array([], dtype="S1")
        continue
      # Old files: block1_conv1_W_1:0 / _b_1:0; Keras 2 files: kernel:0 / bias:0.
      w_name, b_name = ((f"{name}_W_1:0", f"{name}_b_1:0") if name.startswith("block1")
                        else ("kernel:0", "bias:0"))
      group.attrs["weight_names"] = np.array([f"{name}/{w_name}".encode(),
                                              f"{name}/{b_name}".encode()])
      group.create_dataset(f"{name}/{w_name}", data=layers[name][0])
      group.create_dataset(f"{name}/{b_name}", data=layers[name][1])
    if model_save:
      f.create_dataset("optimizer_weights/training/SGD/fc1/kernel/momentum:0",
                       data=np.zeros_like(layers["fc1"][0]))


@pytest.mark.parametrize("model_save", [False, True])
def test_keras2_h5_layout_gives_the_numpy_reference_logits(model_save, tmp_path):
  layers = random_keras_layers("D")
  write_keras2_h5(tmp_path / "vgg16.h5", layers, model_save=model_save)
  images = real_images()
  params, meta = convert.convert_file("keras", "vgg16", str(tmp_path / "vgg16.h5"))
  assert meta["input_convention"] == convert.KERAS_CAFFE
  for name in ("conv1_1", "conv5_3"):  # kept as Keras stores them: BGR input channels
    np.testing.assert_array_equal(
        params[name]["kernel"], layers[f"block{name[4]}_conv{name[6]}"][0])
  np.testing.assert_array_equal(params["fc6"]["kernel"], layers["fc1"][0])
  assert_logits_close(apply_ours(meta, params, images), numpy_keras_vgg(layers, images))


def test_keras_bgr_net_flipped_to_rgb_input(tmp_path):
  layers = random_keras_layers("D")
  write_keras2_h5(tmp_path / "vgg16.h5", layers)
  images = real_images()
  params, meta = convert.convert_file("keras", "D", str(tmp_path / "vgg16.h5"),
                                      rgb=True)
  convention = meta["input_convention"]
  assert convention["channel_order"] == "RGB"
  assert_logits_close(apply_ours(meta, params, images), numpy_keras_vgg(layers, images))
  # The paper's (Caffe's) convention: RGB 0..255 minus the mean RGB, which the input
  # pipeline's config fields express.
  assert convert.pipeline_fields(convention) == dict(
      mean_rgb="123.68,116.779,103.939", normalize_std=False)
  fields = convert.pipeline_fields(convert.TORCHVISION)
  assert fields["mean_rgb"] == "123.675,116.28,103.53"
  assert fields["normalize_std"]
  with pytest.raises(ValueError, match="--rgb"):
    convert.pipeline_fields(convert.KERAS_CAFFE)


def test_convert_command(tmp_path):
  import subprocess
  import sys
  write_keras2_h5(tmp_path / "vgg16.h5", random_keras_layers("D"))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "vgg_jax.convert", "--from=keras", "--model=vgg16",
       f"--input={tmp_path / 'vgg16.h5'}", f"--output={tmp_path / 'out'}", "--rgb"],
      cwd=repo, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "--config.mean_rgb=123.68,116.779,103.939 --config.normalize_std=False" \
      in result.stdout
  params, meta = checkpointing.load_params(str(tmp_path / "out"))
  assert (meta["model"], meta["source"], meta["input_convention"]["channel_order"]) == \
      ("D", "keras", "RGB")
  assert params["fc8"]["kernel"].shape == (FC_WIDTH, NUM_CLASSES)


def test_keras_notop_file_converts_the_convs_only(tmp_path):
  layers = {k: v for k, v in random_keras_layers("E").items() if k.startswith("block")}
  write_keras2_h5(tmp_path / "notop.h5", layers)
  params, meta = convert.convert_file("keras", "E", str(tmp_path / "notop.h5"))
  assert sorted(params) == sorted(models.conv_names("E")) and not meta["head"]
  with pytest.raises(ValueError, match=r"VGG19: E"):
    convert.convert_keras(str(tmp_path / "notop.h5"), "D")


def test_keras_files_written_by_keras(tmp_path):
  """Keras 3 writes .weights.h5 (layers/<class>/vars), legacy .h5 and .keras files."""
  keras = pytest.importorskip("keras", exc_type=ImportError,
                              reason="Keras is not importable.")
  from keras import layers as kl
  ours = random_keras_layers("D", seed=1)
  net = keras.Sequential([keras.Input((SIZE, SIZE, 3))], name="vgg16")
  for name, (kernel, _) in ours.items():
    if name.startswith("block"):
      net.add(kl.Conv2D(kernel.shape[-1], 3, padding="same", activation="relu",
                        name=name))
      if name in ("block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3",
                  "block5_conv3"):
        net.add(kl.MaxPooling2D(2, 2, name=f"block{name[5]}_pool"))
    else:
      if name == "fc1":
        net.add(kl.Flatten(name="flatten"))
      net.add(kl.Dense(kernel.shape[-1], activation=None if name == "predictions"
                       else "relu", name=name))
  for name, (kernel, bias) in ours.items():
    net.get_layer(name).set_weights([kernel, bias])
  images = real_images()
  from keras.applications import vgg16
  reference = np.asarray(net(vgg16.preprocess_input(images.copy())))
  assert_logits_close(numpy_keras_vgg(ours, images), reference)
  net.save_weights(str(tmp_path / "vgg16.weights.h5"))
  net.save(str(tmp_path / "vgg16.h5"))
  net.save(str(tmp_path / "vgg16.keras"))
  for file in ("vgg16.weights.h5", "vgg16.h5", "vgg16.keras"):
    params, meta = convert.convert_file("keras", "D", str(tmp_path / file))
    assert_logits_close(apply_ours(meta, params, images), reference)


# ------------------------------------------------------------ input conventions


def test_apply_input_convention():
  rgb = np.array([[[[255.0, 128.0, 0.0]]]], np.float32)
  torch_in = convert.apply_input_convention(rgb, convert.TORCHVISION)
  np.testing.assert_allclose(
      torch_in[0, 0, 0], [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224,
                          (0 - 0.406) / 0.225], rtol=1e-6)
  keras_in = convert.apply_input_convention(rgb, convert.KERAS_CAFFE)
  np.testing.assert_allclose(keras_in[0, 0, 0],
                             [0 - 103.939, 128 - 116.779, 255 - 123.68], rtol=1e-6)
  jax_in = convert.apply_input_convention(jnp.asarray(rgb), convert.KERAS_CAFFE)
  assert isinstance(jax_in, jax.Array)
  np.testing.assert_allclose(jax_in, keras_in, rtol=1e-6)
  native = convert.input_convention({"model": "D"})  # a net trained by vgg_jax
  assert convert.is_native(native)
  np.testing.assert_array_equal(convert.apply_input_convention(rgb, native), rgb)
  assert convert.input_convention({"input_convention": convert.KERAS_CAFFE}) == \
      convert.KERAS_CAFFE


def test_full_size_vgg16_shapes_without_allocating():
  """A full-size torchvision VGG16 state dict (as shapes) maps onto net D at 224."""
  sd_shapes = {}
  channels = 3
  for name, i in convert.torchvision_conv_indices("D").items():
    out = dict(conv1=64, conv2=128, conv3=256, conv4=512, conv5=512)[name.split("_")[0]]
    sd_shapes[f"features.{i}.weight"] = (out, channels, 3, 3)
    sd_shapes[f"features.{i}.bias"] = (out,)
    channels = out
  for i, (n_in, n_out) in zip((0, 3, 6), ((25088, 4096), (4096, 4096), (4096, 1000))):
    sd_shapes[f"classifier.{i}.weight"] = (n_out, n_in)
    sd_shapes[f"classifier.{i}.bias"] = (n_out,)
  state = {k: np.broadcast_to(np.float32(0), s) for k, s in sd_shapes.items()}
  params = convert.convert_torchvision(state, "D")
  meta = convert.converted_architecture(params, "D")
  assert (meta["crop_size"], meta["num_classes"], meta["fc_width"], meta["width"]) == \
      (224, 1000, 4096, 1.0)
  assert models.count_params(params) == 138_357_544
