"""FeatInv's own module tree, written for tests from its config and code (AI4HealthUOL/FeatInv:
`cldm.cldm.ControlledUnetModel` and `ControlNet` with its feature hint block, on CompVis's
openaimodel blocks), independently of this project's classes: plain torch.nn modules whose
attribute names, nesting and creation order are those of FeatInv's code, so that their
state_dict has the names, shapes and order that a FeatInv checkpoint has."""
from torch import nn

HINT_HIDDEN = 512   # FeatInv's hint block width (fixed in its code)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


class Sequential(nn.Sequential):
    """openaimodel's TimestepEmbedSequential: its children are numbered 0, 1, ..."""


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb: int, out: int):
        super().__init__()
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, 1, 1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(norm(out), nn.SiLU(), nn.Dropout(0),
                                        nn.Conv2d(out, out, 3, 1, 1))
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context, dim, bias=False)
        self.to_v = nn.Linear(context, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0), nn.Linear(4 * dim, dim))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)


class SpatialTransformer(nn.Module):
    """SD v1's: conv projections (use_linear False), inner width = channels (legacy False)."""

    def __init__(self, channels: int, context: int):
        super().__init__()
        self.norm = norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context)])
        self.proj_out = nn.Conv2d(channels, channels, 1)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, 2, 1)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)


def zero_conv(channels: int) -> Sequential:
    return Sequential(nn.Conv2d(channels, channels, 1))


class _Encoder(nn.Module):
    """The half that ControlNet copies: time embedding, input blocks, middle block."""

    def _build_encoder(self, p) -> list[int]:
        mc, emb, context = p.model_channels, 4 * p.model_channels, p.context_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Sequential(nn.Conv2d(p.in_channels, mc, 3, 1, 1))])
        self._zero_conv(mc)
        self._hint_block(p)
        widths, ch, ds = [mc], mc, 1
        for level, mult in enumerate(p.channel_mult):
            for _ in range(p.num_res_blocks):
                layers = [ResBlock(ch, emb, mult * mc)]
                ch = mult * mc
                if ds in p.attention_resolutions:
                    layers.append(SpatialTransformer(ch, context))
                self.input_blocks.append(Sequential(*layers))
                self._zero_conv(ch)
                widths.append(ch)
            if level != len(p.channel_mult) - 1:
                self.input_blocks.append(Sequential(Downsample(ch)))
                self._zero_conv(ch)
                widths.append(ch)
                ds *= 2
        self.middle_block = Sequential(ResBlock(ch, emb, ch), SpatialTransformer(ch, context),
                                       ResBlock(ch, emb, ch))
        self._ds = ds
        return widths

    def _hint_block(self, p) -> None:
        pass

    def _zero_conv(self, channels: int) -> None:
        pass


class ControlledUnetModel(_Encoder):
    """cldm.ControlledUnetModel: openaimodel.UNetModel's tree (only its forward differs)."""

    def __init__(self, p):
        super().__init__()
        widths = self._build_encoder(p)
        mc, emb, ch, ds = p.model_channels, 4 * p.model_channels, widths[-1], self._ds
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(p.channel_mult))[::-1]:
            for i in range(p.num_res_blocks + 1):
                layers = [ResBlock(ch + widths.pop(), emb, mult * mc)]
                ch = mult * mc
                if ds in p.attention_resolutions:
                    layers.append(SpatialTransformer(ch, p.context_dim))
                if level and i == p.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Sequential(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(mc, p.out_channels, 3, 1, 1))


class FeatInvInputHintBlock(nn.Module):
    """FeatInv's hint block: bilinear upsampling to the latent grid, conv 3x3 to 512, SiLU,
    conv 3x3, SiLU, zero conv 3x3 to the model width."""

    def __init__(self, hint_channels: int, model_channels: int, size: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Upsample(size=(size, size), mode="bilinear"),
            nn.Conv2d(hint_channels, HINT_HIDDEN, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(HINT_HIDDEN, HINT_HIDDEN, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(HINT_HIDDEN, model_channels, 3, 1, 1))


class ControlNet(_Encoder):
    """cldm.ControlNet with FeatInv's hint block; attributes in the order its __init__ makes
    them: time_embed, input_blocks, zero_convs, input_hint_block, middle_block, middle_block_out."""

    def __init__(self, p, latent_size: int):
        super().__init__()
        self._latent_size = latent_size
        widths = self._build_encoder(p)
        self.middle_block_out = zero_conv(widths[-1])

    def _hint_block(self, p) -> None:
        self.input_hint_block = FeatInvInputHintBlock(p.hint_channels, p.model_channels,
                                                      self._latent_size)

    def _zero_conv(self, channels: int) -> None:
        if not hasattr(self, "zero_convs"):   # made after input_blocks[0], as in cldm's code
            self.zero_convs = nn.ModuleList()
        self.zero_convs.append(zero_conv(channels))
