"""Why does the network say "dog"? Grad-CAM and saliency for the head ``catdog_bottleneck.py`` trained.

    python examples/catdog_explain.py PHOTO... [--head runs/catdog/head.h5] [--layer block14_sepconv2_act]
        [--samples 8] [--noise 0.15] [--out runs/catdog/explain] [--panel PX] [--palette]
        [--weights PATH] [--plain] [--backend numpy|cupy]

For each photo:

1. load      the photo, resized as in training (bilinear, to the head's image size);
2. classify  Xception without its top (ImageNet weights) -> average pool -> the head: the
             verdict and its probability;
3. Grad-CAM  the gradient of the verdict's logit at ``--layer``, by minixcept's backward
             pass through the head and every layer above that one, weighs that layer's
             channels; where the weighted channels fire is where the evidence is. Try
             block13_sepconv2_act or block4_pool for finer, noisier maps;
4. saliency  the gradient of the same logit with respect to every input pixel, through the
             whole network, averaged over ``--samples`` noisy copies (SmoothGrad);
5. picture   the photo, its heat map laid over it, and its saliency, side by side in
             OUT/<photo name>.png.

The network is built once for all photos. Saliency costs one forward and one backward pass
of the whole network per sample; it runs on the training engine (``--plain``: the plain
layers, about three times slower on a CPU). minixcept.workflows.explain has both maps as
functions for any model, head and layer.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import minixcept
from minixcept.backend import BackendError
from minixcept.errors import WeightsError
from minixcept.files.atomic import WriteError, write_atomically
from minixcept.files.images import ImageDecodeError, load_image
from minixcept.files.paths import OutputPathError, check_output_paths, check_path_relations
from minixcept.workflows import cli, explain
from minixcept.workflows.catdog import DEFAULT_OUT, RANDOM_WEIGHTS, build_base, check_base, get_weights, load_head

CAPTION_HEIGHT = 22          # pixels of text above the three panels
HEAT_OPACITY = 0.55          # of the heat map over the photo where the map is at its peak


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Where a cats-vs-dogs head looks: Grad-CAM and saliency.')
    parser.add_argument('photos', nargs='+', type=Path, help='photos to explain')
    parser.add_argument('--head', type=Path, default=DEFAULT_OUT / 'head.h5',
                        help='the head saved by catdog_bottleneck.py (its head.json must be beside it)')
    parser.add_argument('--layer', default='block14_sepconv2_act', help='the activation Grad-CAM looks at')
    parser.add_argument('--samples', type=cli.positive_int, default=8,
                        help='noisy copies averaged for the saliency map')
    parser.add_argument('--noise', type=cli.non_negative_float, default=0.15,
                        help="SmoothGrad's noise, as a fraction of the input's range")
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT / 'explain', help='folder for the pictures')
    parser.add_argument('--panel', type=cli.positive_int, default=None,
                        help='side of each panel in pixels (default: image size)')
    parser.add_argument('--palette', action='store_true',
                        help='save with 256 colours (a third of the size, for documentation)')
    parser.add_argument('--weights', type=cli.weights_file, default=None,
                        help='Xception notop weights file (default: fetched into weights/ when missing); '
                             'must be the base the head was trained on')
    parser.add_argument('--plain', action='store_true', help='saliency through the plain layers, not the engine')
    parser.add_argument('--backend', choices=('numpy', 'cupy'), default='numpy')
    return parser.parse_args(argv)


# -- 1 and 2. load and classify ------------------------------------------------------------------

def verdict(head, base, x, class_names):
    """(class name, probability) of one preprocessed photo x (1, s, s, 3)."""
    with minixcept.no_grad():
        logits = minixcept.asnumpy(head.forward(base.forward(x))).astype(np.float64)[0]
    if len(logits) == 1:
        dog = 1 / (1 + np.exp(-logits[0]))
        probabilities = np.array([1 - dog, dog])
    else:
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
    best = int(np.argmax(probabilities))
    return best, class_names[best], float(probabilities[best])


# -- 5. the picture ------------------------------------------------------------------------------

def heat_colours(values):
    """(h, w) in [0, 1] -> (h, w, 3) uint8: black, red, yellow, white as the value grows."""
    rgb = np.stack([np.clip(3 * values - shift, 0, 1) for shift in (0, 1, 2)], axis=-1)
    return (255 * rgb).astype(np.uint8)


def overlay(photo, cam):
    """The photo with the Grad-CAM map (scaled to its peak, resized smoothly) laid over it."""
    peak = cam.max()
    scaled = cam / peak if peak > 0 else cam
    size = photo.shape[1], photo.shape[0]
    heat = np.asarray(Image.fromarray(np.uint8(255 * scaled)).resize(size, Image.BICUBIC)) / 255.0
    opacity = HEAT_OPACITY * heat[..., None]
    blended = (1 - opacity) * photo + opacity * heat_colours(heat)
    return blended.astype(np.uint8)


def picture(photo, cam, saliency, caption, panel):
    """Photo | heat map over the photo | saliency (white: most sensitive), captioned, as a Pillow image."""
    panels = [photo, overlay(photo, cam), np.repeat(np.uint8(255 * saliency)[..., None], 3, axis=2)]
    sheet = Image.new('RGB', (3 * panel, panel + CAPTION_HEIGHT), 'white')
    for index, array in enumerate(panels):
        sheet.paste(Image.fromarray(array).resize((panel, panel), Image.BILINEAR), (index * panel, CAPTION_HEIGHT))
    ImageDraw.Draw(sheet).text((4, 5), caption, fill='black')
    return sheet


def main(argv=None):
    args = parse_args(argv)
    try:
        minixcept.use(args.backend)
        check_output_paths(folders={'--out folder': args.out})
        check_path_relations(   # one picture per photo, named after it: no two the same, none over an input
            outputs={f'picture of {photo}': args.out / f'{photo.stem}.png' for photo in args.photos},
            inputs={**{f'photo {photo}': photo for photo in args.photos}, '--head file': args.head,
                    'head description': args.head.with_suffix('.json'),
                    **({'--weights file': args.weights} if args.weights not in (None, RANDOM_WEIGHTS) else {})})
        head, description = load_head(args.head)
        size = description['image_size']
        weights = get_weights(args.weights)
        check_base(description, weights, args.head)
        base = build_base(weights, size, seed=0)
    except (WeightsError, BackendError, OutputPathError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    if args.layer not in {layer.name for layer in base.layers}:
        print(f"error: Xception has no layer named {args.layer!r} (try block14_sepconv2_act, "
              f"block13_sepconv2_act or block4_pool)", file=sys.stderr)
        return 2
    if args.plain:
        saliency_model = base
    else:
        from minixcept.engines.training import GradientEngine
        saliency_model = GradientEngine(base)
    args.out.mkdir(parents=True, exist_ok=True)
    class_names = description['class_names']
    failed = 0
    for number, path in enumerate(args.photos, 1):
        try:
            photo = load_image(path, (size, size))
        except (ImageDecodeError, OSError) as error:
            print(f'{path}: skipped, {error}', file=sys.stderr)
            failed += 1
            continue
        x = minixcept.to_device(minixcept.preprocess_input(photo[None]))
        best, class_name, probability = verdict(head, base, x, class_names)

        started = time.perf_counter()
        cam = explain.grad_cam(base, head, x, args.layer, class_index=best)[0]
        cam_seconds = time.perf_counter() - started

        def progress(done, total):
            print(f'\r  {path.name}: saliency {done}/{total}', end='', file=sys.stderr, flush=True)

        started = time.perf_counter()
        gradient = explain.saliency(saliency_model, head, x, samples=args.samples, noise=args.noise,
                                    class_index=best, progress=progress)
        saliency_seconds = time.perf_counter() - started
        print('\r', end='', file=sys.stderr)

        caption = (f'{path.name}: {class_name} {probability:.3f}   |   Grad-CAM at {args.layer}   |   '
                   f'SmoothGrad, {args.samples} samples')
        out_file = args.out / f'{path.stem}.png'
        sheet = picture(photo, cam, explain.saliency_image(gradient)[0], caption, args.panel or size)
        try:
            write_atomically(out_file, lambda temporary: (sheet.quantize(256) if args.palette else sheet).save(
                temporary, format='PNG', optimize=True))
        except WriteError as error:           # a full disk will not be emptier for the next photo
            print(f'error: {error}', file=sys.stderr)
            return 1
        print(f'{path}\t{class_name}\t{probability:.4f}\t{out_file}\t'
              f'Grad-CAM {cam_seconds:.1f} s, saliency {saliency_seconds:.1f} s  ({number}/{len(args.photos)})')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
