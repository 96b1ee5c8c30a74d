"""One progress line for the long loops of the workflows: an epoch of ``fit``, an extraction.

    epoch 2/3  batch 4/10  32.0 photos/s  0:03 left
    train  batch 12/63  10.4 photos/s  1:20 left

On a terminal each line overwrites the one before; in a log each is a line of its own.
A line is written at most every ``interval`` seconds, and a last one at the end if any was
written, so a loop shorter than ``interval`` writes nothing. Time left is always written
the same way, by ``duration``.
"""
import time


def duration(seconds):
    """Seconds as 'M:SS' (or 'H:MM:SS'); '?' when not known (an infinite or NaN estimate)."""
    if not seconds < float('inf'):
        return '?'
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'


class Progress:
    """How far a loop over batches of photos got: batches done, photos per second, time left.

    stream: where the lines go. batches, photos: the loop's totals. The prefix is ``label``,
    or 'epoch 2/3' from ``epoch`` and ``epochs``. ``done`` photos were done before this run
    (a resumed extraction): the rate counts only those done here.
    """

    def __init__(self, stream, epoch=None, epochs=None, batches=0, photos=0, interval=2.0, label='', done=0):
        self.stream, self.interval = stream, interval
        self.prefix = label or f'epoch {epoch:>{len(str(epochs))}}/{epochs}'
        self.batches, self.photos, self.done_before = batches, photos, done
        self.started = self.last_written = time.monotonic()
        self.written = False
        self.overwrite = getattr(stream, 'isatty', lambda: False)()

    def update(self, batches_done, photos_done):
        now = time.monotonic()
        if now - self.last_written >= self.interval:
            self._write(batches_done, photos_done, now)

    def finish(self, batches_done, photos_done):
        if self.written:
            self._write(batches_done, photos_done, time.monotonic())
            if self.overwrite:
                self.stream.write('\n')
                self.stream.flush()

    def _write(self, batches_done, photos_done, now):
        rate = (photos_done - self.done_before) / max(now - self.started, 1e-9)
        left = (self.photos - photos_done) / rate if rate > 0 else float('inf')
        line = (f'{self.prefix}  batch {batches_done}/{self.batches}  {rate:.1f} photos/s  '
                f'{duration(left)} left')
        self.stream.write(('\r' + line.ljust(72)) if self.overwrite else line + '\n')
        self.stream.flush()
        self.last_written, self.written = now, True
