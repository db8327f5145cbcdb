"""prepare(): what training reads, written and loaded back; item categories for HRNN-meta."""
from __future__ import annotations

import numpy as np

from dist_rec.config import DataConfig
from dist_rec.data.prepare import PreparedData, prepare


def test_prepared_data_round_trip_with_item_categories(tmp_path):
    # user,item,category,behavior,timestamp. Item 7 moves from category 500 to 300; user 9 has 10
    # events (the only possible test user: TDM needs 10+); item 8 is only touched by user 9.
    rows = ["1,5,300,pv,100", "1,7,500,pv,110", "1,5,300,buy,120", "2,6,100,pv,100",
            "2,7,300,cart,200", "2,5,300,pv,210"] + [f"9,{item},100,pv,{300 + i}"
                                                      for i, item in enumerate([6] * 9 + [8])]
    csv = tmp_path / "UserBehavior.csv"
    csv.write_text("\n".join(rows) + "\n")
    config = DataConfig(events_uri=str(csv), window_length=4)

    written = prepare(config, str(tmp_path / "prepared"), test_users=1, seed=0)
    prepared = PreparedData.load(str(tmp_path / "prepared"))
    vocab = prepared.vocabulary()
    dims = prepared.dimensions
    assert (dims.num_items, dims.item_feature_sizes) == (3, (3,))        # items 5, 6, 7 of users 1, 2
    assert vocab.items.raw_ids.tolist() == [5, 6, 7] and vocab.items.encode(np.array([8]))[0] == 0
    # Dense category codes by ascending raw id: 100 -> 1, 300 -> 2, 500 -> 3; item 7's newest is 300.
    assert prepared.item_features.tolist() == [[0], [2], [1], [2]]
    assert written.item_features.tolist() == prepared.item_features.tolist()
    assert prepared.item_counts.tolist() == [0, 3, 1, 2]                  # training events per item
    assert prepared.test_histories().num_rows == 1
