"""The numerical engine: one code path on NumPy/SciPy (CPU) or CuPy (GPU), chosen by ``xp``.

Conventions, stated once (README "Conventions" repeats them):

* Arrays are ``(..., h, w)``: y is the row index, x the column index; batching is leading dims.
* Pixel centres sit at integer indices. A box of size ``b`` has its centre at index ``b // 2``
  (the FFT convention, as RELION). A pick at ``(x, y)`` (movie pixels, 0-based) is the pixel
  with column ``x`` and row ``y``.
* Shifts are ``(..., 2)`` ordered ``(dx, dy)`` in pixels. A trajectory value ``s_t`` is where the
  specimen *is* in frame ``t`` relative to the reference: a feature at ``p`` in the reference is at
  ``p + s_t`` in frame ``t``. Correcting frame ``t`` shifts it by ``-s_t``. The reference frame
  (``s = 0``) is the central frame by default (``motion.reference_frame``).
* Fourier transforms are unnormalised forward (numpy "backward" norm). Frequencies are in cycles
  per pixel from ``fftfreq``/``rfftfreq``. Shifting an image's content by ``+s`` multiplies its
  transform by ``exp(-2*pi*i*(kx*dx + ky*dy))``.
* Gain: ``multiply`` -> corrected = raw * gain; ``divide`` -> corrected = raw / gain; 0 where the
  gain is not finite or (divide) 0 (``gpu.gain.gain_multiplier``). The gain is oriented first: ``rotate`` quarter turns counter-clockwise (``numpy.rot90``
  on ``(h, w)``), then ``flip_x`` (reverse columns), then ``flip_y`` (reverse rows).
* Exposure: frame ``f`` (0-based) has received ``pre_exposure + dose_per_frame * (f + 1)`` e/Å² at
  its end (RELION, MotionCor3).
"""
