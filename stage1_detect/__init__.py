"""Stage 1: 3D RetinaNet-style nodule detector (proposes candidate boxes in world mm).

Planned in issue #5; imports :mod:`lidc_det`, never the other stage packages.
"""
