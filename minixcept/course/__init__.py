"""The course's grader: checks a learner's layer functions against TensorFlow and finite
differences, and says in words what is wrong first.

The tour (the notebooks in ``tour/``) asks the learner to write a function, then calls
the check for it:

    >>> from minixcept import course
    >>> print(course.check_depthwise_backward(my_depthwise_backward))
    depthwise backward: not yet.
    Case TensorFlow, 3x3 'same' at stride 2, even 8x8 input: dx differs at [0, 7, 2, 1] ...

Every check returns a ``Verdict``: true when every case passes, printed as a sentence that
names the case, the output, the index and a hint. The textbook's own function passes
every check and is named as the model answer. The TensorFlow fixtures are those of the
tests (``tests/reference/``), so the grader works from a clone of the repository.
"""
from .depthwise import check_depthwise_backward, check_depthwise_forward
from .explain import check_grad_cam
from .grader import Verdict
from .graph import check_fan_out_backward, check_middle_block_parameters
from .head import check_binary_crossentropy
from .normalization import check_batch_norm_backward
from .padding import check_same_padding
from .pooling import check_max_pool_backward
from .weights import check_read_layer_weights

__all__ = ['Verdict', 'check_depthwise_backward', 'check_depthwise_forward', 'check_max_pool_backward',
           'check_same_padding', 'check_fan_out_backward', 'check_middle_block_parameters',
           'check_binary_crossentropy', 'check_grad_cam',
           'check_batch_norm_backward', 'check_read_layer_weights']
