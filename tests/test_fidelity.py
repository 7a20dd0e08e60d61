"""Each method's default configuration against a reference step written from its paper and its official code.

The references follow the official codes' steps (TorchSemiSeg for CPS, CPS + CutMix and mean teacher, UniMatch's
`fixmatch.py`, `yassouali/CCT`, `Luffy03/CISC-R`) on semiseg's network, with the same weights and inputs.
"""
import copy
import math
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from semiseg.config import make_config, parse_args, usage
from semiseg.method import get_method, registered
from semiseg.models import build_model, forward_parts

NC, B, S = 5, 2, 32          # classes, images per batch, image side


def batches(n_unlabeled, seed=1):
    "A labeled batch and `n_unlabeled` unlabeled batches of random images."
    g = torch.Generator().manual_seed(seed)
    lab = dict(image=torch.randn(B, 3, S, S, generator=g), mask=torch.randint(0, NC, (B, S, S), generator=g))
    unl = [dict(image=torch.randn(B, 3, S, S, generator=g)) for _ in range(n_unlabeled)]
    return lab, unl


def step_terms(method, lab, unl, it=0):
    "The method's terms and summed loss of one step (the trainer's sum), backward done."
    terms = method(lab, unl or None, it)
    loss = sum(v for k, v in terms.items() if k.startswith("loss"))
    loss.backward()
    return terms, loss


def buffers(net):
    return {k: v.clone() for k, v in net.named_buffers()}


def assert_same_buffers(a, b):
    for k in a:
        assert torch.equal(a[k], b[k]), k


def grads(net):
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


def assert_close_grads(a, b, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        scale = b[k].abs().max().clamp_min(1e-12)
        assert (a[k] - b[k]).abs().max() <= rtol * scale, (k, (a[k] - b[k]).abs().max().item(), scale.item())


# --- the per-part BatchNorm forward --------------------------------------------------------------------------------

def test_forward_parts_is_the_separate_calls():
    "Outputs and running statistics bit for bit; gradients as close to float64 as the separate calls' own."
    torch.manual_seed(0)
    net = build_model(NC).train()
    lab, (unl,) = batches(1)
    x, u, y = lab["image"], unl["image"], lab["mask"]

    def run(model, mode, dtype=torch.float32):
        m = copy.deepcopy(model).to(dtype)
        px, pu = forward_parts(m, x.to(dtype), u.to(dtype), mode=mode)
        F.cross_entropy(torch.cat([px, pu]), torch.cat([y, y])).backward()
        return torch.cat([px, pu]).detach(), buffers(m), grads(m)

    out_p, buf_p, g_p = run(net, "parts")
    out_s, buf_s, g_s = run(net, "separate")
    _, _, g64 = run(net, "separate", torch.float64)
    assert torch.equal(out_p, out_s)
    assert_same_buffers(buf_p, buf_s)
    err_p = max(((g_p[k].double() - g64[k]).abs().max() / g64[k].abs().max().clamp_min(1e-30)).item() for k in g64)
    err_s = max(((g_s[k].double() - g64[k]).abs().max() / g64[k].abs().max().clamp_min(1e-30)).item() for k in g64)
    diff = max(((g_p[k] - g_s[k]).abs().max() / g_s[k].abs().max().clamp_min(1e-30)).item() for k in g_s)
    assert err_p <= 2 * err_s and diff <= err_s, (err_p, err_s, diff)   # float32 rounding, as the separate calls
    out_j, _, _ = run(net, "joint")
    assert (out_j - out_s).abs().max() > 1e-2                         # one joint call: other statistics


# --- CPS and CPS + CutMix: TorchSemiSeg's steps --------------------------------------------------------------------

def official_cps_step(net_l, net_r, lab, unl, lam):
    "exp.voc/voc8.res50v3+.CPS/train.py: four calls, one mean over labeled ⊕ unlabeled, loss_sup + loss_sup_r + λ·cps."
    pred_sup_l, pred_unsup_l = net_l(lab["image"]), net_l(unl[0]["image"])
    pred_sup_r, pred_unsup_r = net_r(lab["image"]), net_r(unl[0]["image"])
    pred_l, pred_r = torch.cat([pred_sup_l, pred_unsup_l]), torch.cat([pred_sup_r, pred_unsup_r])
    max_l, max_r = pred_l.max(1).indices, pred_r.max(1).indices
    ce = nn.CrossEntropyLoss(ignore_index=255)
    cps = (ce(pred_l, max_r) + ce(pred_r, max_l)) * lam
    loss_sup = ce(pred_sup_l, lab["mask"]) + ce(pred_sup_r, lab["mask"])
    return loss_sup, cps


def official_cps_cutmix_step(net_l, net_r, lab, unl, box, lam):
    "exp.voc/voc8.res50v3+.CPS+CutMix/train.py: teachers on U0, U1 (train mode, no grad), mixed logits, students."
    u0, u1 = unl[0]["image"], unl[1]["image"]
    mixed = u0 * (1 - box) + u1 * box
    with torch.no_grad():
        t1 = net_l(u0) * (1 - box) + net_l(u1) * box
        t2 = net_r(u0) * (1 - box) + net_r(u1) * box
    ps_1, ps_2 = t1.max(1).indices, t2.max(1).indices
    ce = nn.CrossEntropyLoss(ignore_index=255)
    cps = (ce(net_l(mixed), ps_2) + ce(net_r(mixed), ps_1)) * lam
    loss_sup = ce(net_l(lab["image"]), lab["mask"]) + ce(net_r(lab["image"]), lab["mask"])
    return loss_sup, cps


@pytest.mark.parametrize("mode", ["parts", "separate"])
def test_cps_step_is_the_official_step(mode):
    torch.manual_seed(0)
    m = get_method("cps")(*make_config(method="cps", forward=mode), NC).train()
    assert (m.opts.ws, m.opts.copy_paste, m.lam(0)) == (False, "none", 1.5)
    ref = copy.deepcopy(m.nets)
    lab, unl = batches(1)
    terms, loss = step_terms(m, lab, unl)
    sup, cps = official_cps_step(ref[0], ref[1], lab, unl, 1.5)
    assert torch.equal(terms["loss_sup"], sup) and torch.equal(terms["loss_cps"], cps)
    assert torch.equal(loss, sup + cps)
    (sup + cps).backward()
    for k in range(2):
        assert_same_buffers(buffers(m.nets[k]), buffers(ref[k]))
        if mode == "separate":                                        # the same calls: the same gradients, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(grads(m.nets[k]).values(), grads(ref[k]).values()))
        else:                                                         # one call: the same up to summation order
            assert_close_grads(grads(m.nets[k]), grads(ref[k]))


@pytest.mark.parametrize("mode", ["parts", "separate"])
def test_cps_cutmix_step_is_the_official_step(mode):
    torch.manual_seed(0)
    m = get_method("cps_cutmix")(*make_config(method="cps_cutmix", forward=mode), NC).train()
    assert (m.lam(0), m.on_labeled, m.needs_unlabeled) == (1.0, False, 2)      # the official VOC CutMix config
    ref = copy.deepcopy(m.nets)
    lab, unl = batches(2)
    box = torch.zeros(B, 1, S, S)
    box[0, :, 4:20, 6:30] = 1
    box[1, :, 10:31, 0:12] = 1
    with mock.patch("semiseg.methods.cps.box_mask", lambda *a, **k: box):
        terms, loss = step_terms(m, lab, unl)
    sup, cps = official_cps_cutmix_step(ref[0], ref[1], lab, unl, box, 1.0)
    assert torch.equal(terms["loss_sup"], sup) and torch.equal(terms["loss_cps"], cps)
    (sup + cps).backward()
    for k in range(2):
        assert_same_buffers(buffers(m.nets[k]), buffers(ref[k]))     # calls in the official order: U0, U1, mixed, X
        assert_close_grads(grads(m.nets[k]), grads(ref[k]), rtol=1e-4 if mode == "parts" else 1e-7)


def test_cps_lambda_of_the_papers():
    lam = {(n, d): get_method(n)(*make_config(method=n, dataset=d), NC).lam(0)
           for n in ("cps", "cps_cutmix", "sps", "sps_cutmix") for d in ("voc", "cityscapes")}
    assert lam == {("cps", "voc"): 1.5, ("cps", "cityscapes"): 6.0, ("cps_cutmix", "voc"): 1.0,
                   ("cps_cutmix", "cityscapes"): 5.0, ("sps", "voc"): 1.5, ("sps", "cityscapes"): 6.0,
                   ("sps_cutmix", "voc"): 1.5, ("sps_cutmix", "cityscapes"): 6.0}


# --- mean teacher: TorchSemiSeg's MeanTeacher ----------------------------------------------------------------------

def test_mean_teacher_step_and_evaluated_network_are_the_official():
    torch.manual_seed(0)
    m = get_method("mt")(*make_config(method="mt", iters=100), NC).train()
    student, teacher = copy.deepcopy(m.net), copy.deepcopy(m.teacher)
    lab, unl = batches(1)
    terms, _ = step_terms(m, lab, unl)
    # exp.voc/voc8.res50v3+.MeanTeacher: model(imgs, step=1) -> student, teacher, EMA; model(unsup_imgs, step=2)
    s_sup, t_sup = student(lab["image"]), teacher(lab["image"]).detach()
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(0.99).add_(s, alpha=1 - 0.99)
    s_unsup, t_unsup = student(unl[0]["image"]), teacher(unl[0]["image"]).detach()
    csst = nn.MSELoss()(F.softmax(torch.cat([s_sup, s_unsup]), 1), F.softmax(torch.cat([t_sup, t_unsup]), 1)) * 100
    sup = nn.CrossEntropyLoss(ignore_index=255)(s_sup, lab["mask"])
    assert torch.equal(terms["loss_sup"], sup) and torch.equal(terms["loss_cons"], csst)   # no ramp-up: weight 100
    (sup + csst).backward()
    assert_close_grads(grads(m.net), grads(student))
    assert all(torch.equal(a, b) for a, b in zip(m.teacher.parameters(), teacher.parameters()))
    assert_same_buffers(buffers(m.net), buffers(student))
    assert_same_buffers(buffers(m.teacher), buffers(teacher))
    assert m.eval_model() is m.net                                                 # the official code evaluates branch1


# --- FixMatch: UniMatch's fixmatch.py ------------------------------------------------------------------------------

def test_fixmatch_step_is_unimatch():
    torch.manual_seed(0)
    m = get_method("fixmatch")(*make_config(method="fixmatch", conf_thresh=0.3), NC).train()
    net = copy.deepcopy(m.net)
    lab, unl = batches(2)
    box = torch.zeros(B, 1, S, S)
    box[0, :, 3:17, 5:21] = 1                                                       # image 1: no box

    def strong(x, ops=None):
        return x.flip(1) * 0.7
    with mock.patch("semiseg.methods.fixmatch.cutmix_box", lambda *a, **k: box), \
            mock.patch("semiseg.methods.fixmatch.strong_photometric", strong):
        _, loss = step_terms(m, lab, unl)
    img_x, img_u_w, img_u_w_mix = lab["image"], unl[0]["image"], unl[1]["image"]
    with torch.no_grad():
        net.eval()
        pred_mix = net(img_u_w_mix).detach()
        conf_mix, mask_mix = pred_mix.softmax(1).max(1)[0], pred_mix.argmax(1)
    net.train()
    img_u_s = strong(img_u_w).clone()
    cut = box.expand(img_u_s.shape) == 1
    img_u_s[cut] = strong(img_u_w_mix)[cut]
    pred_x, pred_u_w = net(torch.cat([img_x, img_u_w])).split([B, B])
    pred_u_s = net(img_u_s)
    pred_u_w = pred_u_w.detach()
    conf_u_w, mask_u_w = pred_u_w.softmax(1).max(1)[0], pred_u_w.argmax(1)
    mask_cut, conf_cut = mask_u_w.clone(), conf_u_w.clone()
    mask_cut[box[:, 0] == 1] = mask_mix[box[:, 0] == 1]
    conf_cut[box[:, 0] == 1] = conf_mix[box[:, 0] == 1]
    loss_x = nn.CrossEntropyLoss(ignore_index=255)(pred_x, lab["mask"])
    loss_u_s = nn.CrossEntropyLoss(reduction="none")(pred_u_s, mask_cut) * (conf_cut >= 0.3)
    loss_u_s = loss_u_s.sum() / conf_cut.numel()                                    # no padding: every pixel valid
    ref = (loss_x + loss_u_s) / 2.0
    assert abs(loss.item() - ref.item()) < 1e-6
    ref.backward()
    assert_close_grads(grads(m.net), grads(net))
    assert get_method("fixmatch")(*make_config(method="fixmatch", dataset="cityscapes"), 19).tau == 0.0


# --- CCT: yassouali/CCT --------------------------------------------------------------------------------------------

def test_cct_defaults_are_the_official_config():
    o = make_config(method="cct")[1]
    counts = dict(vat=o.aux_vat, drop=o.aux_drop, cutout=o.aux_cutout, con_msk=o.aux_con_msk, obj_msk=o.aux_obj_msk,
                  f_drop=o.aux_f_drop, f_noise=o.aux_f_noise)
    assert counts == dict(vat=2, drop=6, cutout=6, con_msk=2, obj_msk=2, f_drop=6, f_noise=6)      # config.json
    assert (o.unsup_weight, o.rampup, o.drop_rate, o.erase, o.uniform_range) == (30.0, 0.1, 0.5, 0.4, 0.3)
    assert (o.f_drop_lo, o.f_drop_hi, o.vat_xi, o.vat_eps, o.decoder) == (0.7, 0.9, 1e-6, 2.0, "subpixel")


def test_cct_consistency_is_the_official_loss():
    "L_u = mean over decoders of mse(softmax(aux_k), softmax(main).detach()), each decoder on its masked z."
    torch.manual_seed(0)
    m = get_method("cct")(*make_config(method="cct", aux="con_msk:2,obj_msk:2", iters=10), NC).train()
    lab, unl = batches(1)
    net_ref = copy.deepcopy(m.net)
    terms = m(lab, unl, it=10)
    img_u = unl[0]["image"]
    z = net_ref.decode(*net_ref.encode(img_u))
    with torch.no_grad():
        main = net_ref.classifier(z)
    target = F.softmax(F.interpolate(main, size=(S, S), mode="bilinear", align_corners=True), 1)
    fg = (main.argmax(1) > 0).float()[:, None]                                      # models/decoders.py guided_masking
    fg = F.interpolate(fg, size=z.shape[-2:], mode="nearest")
    losses = []
    for k, mask in enumerate([fg, fg, 1 - fg, 1 - fg]):                           # con_msk ×2, obj_msk ×2
        first = F.conv2d(z * mask, m.aux.weight[k][:, :, None, None])               # the decoder's 1×1 conv
        y = first
        for w, b in zip(m.aux.stage_w, m.aux.stage_b):                  # sub-pixel stages: conv, ReLU, shuffle
            y = F.pixel_shuffle(F.relu(F.conv2d(y, w[k][:, :, None, None], b[k])), 2)
        losses.append(F.mse_loss(F.softmax(y, 1), target.detach()))
    ref = sum(losses) / len(losses)
    assert abs(terms["consistency"].item() - ref.item()) < 1e-6


# --- UCC: the paper's text -----------------------------------------------------------------------------------------

def test_ucc_defaults_are_the_papers_readings():
    o = make_config(method="ucc")[1]
    assert (o.ucc_weight, o.cross, o.ws, o.copy_paste) == (2.0, "head", True, "dcscp")
    assert (o.ugrm, o.ugrm_rule) == (True, "teacher")
    assert o.paste_draws == 3                                                       # paste_draws=1: "one category"
    for f in ("configs/ucc_voc.yaml", "configs/ucc_cityscapes.yaml"):
        cfg, _ = make_config(parse_args([f]))
        assert (cfg.method, cfg.ohem, cfg.optimizer, cfg.weight_decay) == ("ucc", True, "sgd", 5e-4)   # OHEM: the paper


def test_ucc_loss_is_eq_10():
    "L_u of one direction: per image Σ_j u_j ℓ_ce / Σ_j u_j, mean over images, u = w·1[w_teacher > w_student]."
    from semiseg.methods.ucc import ugrm_weights, weighted_ce
    g = torch.Generator().manual_seed(0)
    logits_s, logits_t1, logits_t2 = (torch.randn(2, NC, 6, 6, generator=g) for _ in range(3))
    w1, q1 = logits_t1.softmax(1).max(1)
    w2 = logits_t2.softmax(1).max(1)[0]
    u1, _ = ugrm_weights(w1, w2)
    ce = F.cross_entropy(logits_s, q1, reduction="none")
    ind = (w1 > w2).float()
    ref = torch.stack([(w1[i] * ind[i] * ce[i]).sum() / (w1[i] * ind[i]).sum() for i in range(2)]).mean()
    assert abs(weighted_ce(logits_s, q1, u1).item() - ref.item()) < 1e-6


# --- CISC-R: Luffy03/CISC-R ----------------------------------------------------------------------------------------

def gap(feat, mask):
    "train.py Weighted_GAP."
    mask = mask.unsqueeze(1).float()
    feat = F.interpolate(feat, size=mask.shape[-2:], mode="bilinear")
    h, w = feat.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
    return F.avg_pool2d(feat * mask, (h, w)) * h * w / area


def consist(feat1, map1, mask1, feat2, map2, mask2):
    "train.py consist(MODE='train')."
    s1 = F.interpolate(F.cosine_similarity(feat1, gap(feat2, map2)).unsqueeze(1), size=map1.shape[-2:],
                       mode="bilinear").view(map1.shape)
    s2 = F.interpolate(F.cosine_similarity(feat2, gap(feat1, map1)).unsqueeze(1), size=map2.shape[-2:],
                       mode="bilinear").view(map2.shape)
    loss1 = F.binary_cross_entropy(s1, map1.float(), reduction="none")
    loss2 = F.binary_cross_entropy(s2, map2.float(), reduction="none")
    return loss1[mask1 != 255].mean() + loss2[mask2 != 255].mean()


@pytest.mark.parametrize("pairs_per_process", [2, 1])
def test_ciscr_stage1_step_is_the_official_step(pairs_per_process):
    torch.manual_seed(0)
    m = get_method("ciscr_stage1")(*make_config(method="ciscr_stage1"), NC).train()
    net = copy.deepcopy(m.net)
    g = torch.Generator().manual_seed(2)
    n = pairs_per_process
    mask1, mask2 = torch.randint(0, 3, (n, S, S), generator=g), torch.randint(0, 3, (n, S, S), generator=g)
    mask1[:, :4] = 255
    pairs = dict(image=torch.randn(n, 3, S, S, generator=g), mask=mask1, image_q=torch.randn(n, 3, S, S, generator=g),
                 mask_q=mask2, map=(mask1 == 1).long(), map_q=(mask2 == 1).long(), cls=torch.ones(n, dtype=torch.long))
    lab, _ = batches(0)
    terms = m(lab, [pairs], 0)
    pred, feat = net(torch.cat([pairs["image"], pairs["image_q"]]), return_features=True)   # one call, as train.py
    seg = F.cross_entropy(pred[:n], mask1, ignore_index=255) + F.cross_entropy(pred[n:], mask2, ignore_index=255)
    con = consist(feat[:n], pairs["map"], mask1, feat[n:], pairs["map_q"], mask2)
    assert abs(terms["loss_sup"].item() - seg.item()) < 1e-6
    assert abs(terms["loss_cisc"].item() - con.item()) < 1e-5 and con.item() > 0.05


def test_ciscr_selection_is_the_official(tiny_data):
    "D of an unlabeled image sums over every class of its pseudo label; the query lists keep len // 2 per class."
    from semiseg import data as D
    from semiseg.methods.ciscr import class_anchors, select_reliable
    from semiseg.transforms import eval_transform
    torch.manual_seed(0)
    net = build_model(7).eval()
    ds = D.SegDataset(D.voc_items(tiny_data, "val"), transform=eval_transform())
    sel = select_reliable(net, ds, ds, 7, skip=(0,))
    anchors = class_anchors(net, ds, 7)
    with torch.no_grad():
        for i in range(len(ds)):                                           # make_query_txt.py select_reliable
            s = ds[i]
            mask = s["mask"].as_subclass(torch.Tensor)[None]
            _, feat = net(s["image"].as_subclass(torch.Tensor)[None], return_features=True)
            d = 0.0
            for c in mask.unique().tolist():
                if c == 255:
                    continue
                simi = F.interpolate(F.cosine_similarity(feat, anchors[c].view(1, -1, 1, 1)).unsqueeze(1),
                                     size=mask.shape[-2:], mode="bilinear").view(mask.shape)
                d += F.binary_cross_entropy(simi.clamp(0, 1), (mask == c).float(), reduction="none")[mask != 255].mean()
            assert math.isclose(sel["d_unlabeled"][s["id"]], float(d), rel_tol=1e-4), s["id"]
    assert {k: len(v) for k, v in sel["query"].items()} == {k: len(v) // 2 for k, v in sel["d_labeled"].items()}


# --- names ---------------------------------------------------------------------------------------------------------

def test_recipes_have_names_of_their_own():
    reg = registered()
    paper = ("cps", "cps_cutmix", "sps", "sps_cutmix", "cpc", "mt", "cutmix_seg", "fixmatch", "cct", "ucc", "ciscr")
    for name in ("cps_ucc_aug", "sps_ucc_aug"):
        o = make_config(method=name)[1]
        assert (o.ws, o.copy_paste) == (True, "dcscp") and name not in paper
        assert f"  {name}: " in usage()
    for name in ("cps", "cps_cutmix", "sps", "sps_cutmix"):
        o = make_config(method=name)[1]
        assert (o.ws, o.copy_paste, o.forward) == (False, "none", "parts")
    colours = [info.color for info in reg.values() if not info.name.startswith("ciscr_")]
    assert len(colours) == len(set(colours))


def test_config_files_hold_the_papers_settings():
    for f in ("voc", "cityscapes", "cct_voc", "ucc_voc", "ucc_cityscapes", "ciscr_voc", "ciscr_cityscapes"):
        cfg, opts = make_config(parse_args([f"configs/{f}.yaml"]))
        assert (cfg.optimizer, cfg.momentum, cfg.pretrained) == ("sgd", 0.9, "imagenet"), f
    cfg, opts = make_config(parse_args(["configs/ciscr_voc.yaml", "stage1.iters=3280", "stage2.iters=24800"]))
    assert (cfg.backbone, cfg.output_stride, cfg.crop, cfg.head_lr_mult, cfg.iters) == ("resnet101", 8, 321, 10, 49600)
    assert opts.stage_options == {"stage1": {"iters": 3280}, "stage2": {"iters": 24800}}
