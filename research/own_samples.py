import sys
sys.path.insert(0, 'research')
from proto import *
from diffusers import DDPMScheduler
sch = DDPMScheduler.from_config(CONFIG)
sch.set_timesteps(1000)
g = torch.Generator().manual_seed(123)
x = randn_tensor((1400, 1, 8, 8), generator=g)
for t in sch.timesteps:
    with torch.no_grad():
        x = sch.step(UNET(x, t).sample, t, x, generator=g).prev_sample
torch.save(x, "research/own_samples.pt")
print("own", fd(x))
