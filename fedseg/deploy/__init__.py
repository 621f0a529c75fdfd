"""Flower's Deployment Engine for fedseg: run config from Hydra overrides, a vehicle's own data,
certificates and vehicle keys, and the checks a vehicle launcher makes before ``flower-supernode``.

* :mod:`fedseg.deploy.runconfig`: the one way settings reach a deployed run (``overrides``, the Hydra
  command line of ``fedseg-sim``) and the ``deploy`` block (timeouts, output directory);
* :mod:`fedseg.deploy.vehicle`: what a SuperNode's ``--node-config`` says about its vehicle, and the
  loading of only that vehicle's frames (and of only the server's held-out set);
* :mod:`fedseg.deploy.certs`: a CA, the SuperLink's TLS certificate and one EC key pair per vehicle;
* :mod:`fedseg.deploy.launch`: the ``flower-supernode`` command line of a checked vehicle.
"""
