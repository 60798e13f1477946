

def test_canvas_classifier_pools_by_max_and_round_trips(tmp_path):
    import json

    from dcdit.evaluation import load_classifier, save_classifier, train_classifier

    data = build_dataset(DataConfig(source="canvas", split="test", image_size=32, num_samples=64))
    clf = train_classifier(data, steps=2, batch_size=16, width=8, feature_dim=16)
    assert clf.config.pool == "max" and clf.config.image_size == 32
    x = torch.stack([data[i][0] for i in range(4)])
    back = load_classifier(save_classifier(clf, tmp_path / "c"))
    assert back.config.pool == "max" and torch.equal(back.features(x), clf.features(x))
    assert torch.equal(clf.features(x), torch.relu(clf.proj(clf.body(x).amax(dim=(2, 3)))))
    meta = json.loads((tmp_path / "c" / "classifier.json").read_text())
    del meta["config"]["pool"]  # a classifier saved before the option: mean pooling, as it was trained
    (tmp_path / "c" / "classifier.json").write_text(json.dumps(meta))
    assert load_classifier(tmp_path / "c").config.pool == "mean"
