"""Building the toy world's shipped models (`scripts/train_toy.py`, models/toy/): the target
networks and the oracle (`nets_training`), the toy latent diffusion model (`ldm_training`), its
tiny gradient decoder (`taesd_training`), the trained FeatInv decoders, and the stages that run
them (`build`). Above the toy world (ldm/toy), which imports nothing from here."""
