from vits_ray.cli import main

main(prog_name="vits-ray")
