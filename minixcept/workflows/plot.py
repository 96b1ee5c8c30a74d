"""Training curves as a PNG, drawn with Pillow's ImageDraw (no plotting library needed).

Two panels side by side, loss and accuracy per epoch, each with the training
curve and the validation curve, and a dashed line at the best epoch.
"""
import math

from PIL import Image, ImageDraw, ImageFont

from ..files.atomic import write_atomically

TRAIN_COLOUR = (31, 119, 180)          # blue
VALIDATION_COLOUR = (255, 127, 14)     # orange
BEST_COLOUR = (120, 120, 120)
GRID_COLOUR = (228, 228, 228)
TEXT_COLOUR = (20, 20, 20)


def _font(size):
    try:
        return ImageFont.load_default(size=size)     # Pillow >= 10.1: a scalable font
    except TypeError:                                 # pragma: no cover - older Pillow, bitmap font
        return ImageFont.load_default()


def nice_ticks(low, high, count=5):
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) covering
    [low, high]. Returns (ticks, first, last), the range widened to whole steps."""
    if high <= low:
        high = low + 1.0
    raw_step = (high - low) / count
    power = 10 ** math.floor(math.log10(raw_step))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw_step)
    first, last = math.floor(low / step) * step, math.ceil(high / step) * step
    ticks = [first + i * step for i in range(int(round((last - first) / step)) + 1)]
    return ticks, first, last


def _label(value, step):
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f'{value:.{decimals}f}'


def _panel(draw, box, title, epochs, series, best_epoch, y_range, fonts, legend_at='top'):
    """One chart in ``box`` = (left, top, right, bottom) pixels: axes, grid, ticks, curves, legend.

    series: [(name, colour, values)], values one per epoch (None where missing).
    legend_at: 'top' or 'bottom' right corner, wherever the curves usually are not.
    """
    left, top, right, bottom = box
    plot_left, plot_top, plot_right, plot_bottom = left + 58, top + 30, right - 12, bottom - 42
    ticks, y_low, y_high = nice_ticks(*y_range)
    x_of = lambda epoch: plot_left + (epoch - 1) / max(epochs - 1, 1) * (plot_right - plot_left)   # noqa: E731
    y_of = lambda value: plot_bottom - (value - y_low) / (y_high - y_low) * (plot_bottom - plot_top)  # noqa: E731

    title_width = draw.textlength(title, font=fonts['title'])
    draw.text(((plot_left + plot_right - title_width) / 2, top + 4), title, fill=TEXT_COLOUR, font=fonts['title'])
    for value in ticks:                                   # horizontal grid and y labels
        y = y_of(value)
        draw.line([(plot_left, y), (plot_right, y)], fill=GRID_COLOUR)
        text = _label(value, ticks[1] - ticks[0])
        draw.text((plot_left - 6 - draw.textlength(text, font=fonts['small']), y - 7), text,
                  fill=TEXT_COLOUR, font=fonts['small'])
    x_step = max(1, math.ceil(epochs / 10))
    for epoch in range(1, epochs + 1, x_step):            # x ticks at whole epochs
        x = x_of(epoch)
        draw.line([(x, plot_bottom), (x, plot_bottom + 4)], fill=TEXT_COLOUR)
        text = str(epoch)
        draw.text((x - draw.textlength(text, font=fonts['small']) / 2, plot_bottom + 6), text,
                  fill=TEXT_COLOUR, font=fonts['small'])
    caption = 'epoch'
    draw.text(((plot_left + plot_right - draw.textlength(caption, font=fonts['small'])) / 2, bottom - 20),
              caption, fill=TEXT_COLOUR, font=fonts['small'])
    draw.rectangle([plot_left, plot_top, plot_right, plot_bottom], outline=TEXT_COLOUR)

    if best_epoch:                                        # dashed vertical line at the best epoch
        x = x_of(best_epoch)
        for y in range(int(plot_top), int(plot_bottom), 8):
            draw.line([(x, y), (x, min(y + 4, plot_bottom))], fill=BEST_COLOUR, width=1)

    for name, colour, values in series:
        points = [(x_of(e), y_of(v)) for e, v in zip(range(1, epochs + 1), values)
                  if v is not None and math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2, joint='curve')
        for x, y in points:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)

    legend = [(name, colour) for name, colour, values in series if any(v is not None for v in values)]
    if best_epoch:
        legend.append((f'best epoch ({best_epoch})', BEST_COLOUR))
    legend_width = max(draw.textlength(name, font=fonts['small']) for name, _ in legend) + 34
    legend_height = 18 * len(legend) + 6
    legend_left = plot_right - legend_width - 6
    legend_top = plot_top + 6 if legend_at == 'top' else plot_bottom - legend_height - 6
    draw.rectangle([legend_left, legend_top, plot_right - 6, legend_top + legend_height],
                   fill=(255, 255, 255), outline=GRID_COLOUR)
    for row, (name, colour) in enumerate(legend):
        y = legend_top + 12 + 18 * row
        draw.line([(legend_left + 6, y), (legend_left + 24, y)], fill=colour, width=2)
        draw.text((legend_left + 30, y - 7), name, fill=TEXT_COLOUR, font=fonts['small'])


def plot_history(history, path, title=None, size=(1000, 420)):
    """Draw loss and accuracy per epoch, training and validation, into the PNG ``path``.

    history: a training.History, or a list of per-epoch dicts with 'loss', 'accuracy' and
    optionally 'val_loss', 'val_accuracy' (and then ``best_epoch`` is not marked).
    """
    epochs = history.epochs if hasattr(history, 'epochs') else list(history)
    best_epoch = getattr(history, 'best_epoch', None)
    count = len(epochs)
    if count == 0:
        raise ValueError('plot_history needs at least one epoch')
    column = lambda name: [e.get(name) for e in epochs]   # noqa: E731

    width, height = size
    image = Image.new('RGB', size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fonts = {'title': _font(16), 'small': _font(12)}
    top = 0
    if title:
        draw.text(((width - draw.textlength(title, font=fonts['title'])) / 2, 8), title,
                  fill=TEXT_COLOUR, font=fonts['title'])
        top = 28

    losses = [v for v in column('loss') + column('val_loss') if v is not None and math.isfinite(v)]
    accuracies = [v for v in column('accuracy') + column('val_accuracy') if v is not None]
    panels = [      # losses fall towards 0 and accuracies rise towards 1: legends go where curves end less
        ('loss', (0.0, max(losses, default=1.0) * 1.05), column('loss'), column('val_loss'), 'top'),
        ('accuracy', (min(accuracies, default=0.0), 1.0), column('accuracy'), column('val_accuracy'), 'bottom'),
    ]
    for index, (name, y_range, train, validation, legend_at) in enumerate(panels):
        box = (index * width // 2, top, (index + 1) * width // 2, height)
        _panel(draw, box, name, count,
               [('train', TRAIN_COLOUR, train), ('validation', VALIDATION_COLOUR, validation)],
               best_epoch, y_range, fonts, legend_at)
    return write_atomically(path, lambda temporary: image.save(temporary, format='PNG'))
