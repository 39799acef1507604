"""Objectives and samplers: VP diffusion (IDDPM, respacing, DDPM, DDIM), rectified flow, classifier-free guidance."""
