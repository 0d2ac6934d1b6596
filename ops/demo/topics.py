"""Short scripted exchanges the demo conversations are assembled from.

Each topic is a list of lines spoken alternately by the first and second speaker of a conversation;
a line given as (text, caption, (r, g, b)) shares a generated picture with that caption.
"""

TOPICS = {
    "glacier": [
        "We finally made it to the glacier on the last day of the trip!",
        ("Look at this, the ice was so blue up close.", "a photo of a blue glacier under a cloudy sky", (90, 160, 220)),
        "Wow, that looks unreal. Was it cold on the hike?",
        "Freezing, my fingers went numb taking pictures, but it was worth every minute.",
        "I want to go there next summer, send me the name of the trail.",
    ],
    "sourdough": [
        "I baked my first sourdough loaf this weekend.",
        ("Here it is, not perfect but it rose!", "a photo of a round loaf of sourdough bread on a wooden board", (180, 130, 70)),
        "That crust looks amazing. How long did the starter take?",
        "About ten days of feeding it flour and water every morning.",
        "You have to teach me, my bread always comes out flat.",
    ],
    "job_interview": [
        "I have the second interview for the data engineer job on Thursday.",
        "Nice! Is it the company that builds the train scheduling software?",
        "Yes, they want me to design a pipeline on the whiteboard.",
        "Talk about how you handled the late data at your current job, that story is great.",
        "Good idea, I will practise it tonight.",
    ],
    "puppy": [
        "We adopted a puppy from the shelter yesterday!",
        ("This is Biscuit, he is a beagle mix.", "a photo of a small brown and white beagle puppy on a sofa", (200, 170, 120)),
        "He is adorable! How old is he?",
        "Twelve weeks. He already chewed one of my shoes.",
        "Classic puppy. Get him a rubber toy before he finds the other shoe.",
    ],
    "concert": [
        "Did you get tickets for the jazz concert at the harbour?",
        "Yes, two seats in the second row, it starts at eight.",
        ("The stage is already set up, look.", "a photo of a concert stage with purple lights and a piano", (120, 60, 160)),
        "Second row, amazing. I will bring the umbrella in case it rains.",
    ],
    "moving": [
        "The movers come on Saturday and I have packed only half of the kitchen.",
        "Do you need help? I can bring boxes and tape on Friday evening.",
        "That would save me. The new flat has a balcony facing the river.",
        ("This is the view from the balcony.", "a photo of a river with a bridge seen from a balcony", (70, 120, 160)),
        "Beautiful. We should have breakfast out there once you are settled.",
    ],
    "marathon": [
        "I signed up for the city marathon in October.",
        "Brave! What does your training plan look like?",
        "Four runs a week, the long run grows by two kilometres every Sunday.",
        "Make sure to buy proper running shoes before the long runs, my knees learned that the hard way.",
    ],
    "garden": [
        "The tomatoes in the garden are finally turning red.",
        ("First harvest of the season!", "a photo of a basket of red tomatoes and green basil", (200, 60, 50)),
        "They look delicious. Did you grow the basil from seeds too?",
        "Yes, from seeds on the kitchen window, then I moved them outside in May.",
    ],
    "laptop": [
        "My laptop died in the middle of the presentation today.",
        "Oh no. Did you lose the slides?",
        "No, they were in the cloud, but the battery is completely swollen.",
        "Take it to the repair shop on Elm Street, they replaced my battery in one day.",
    ],
    "wedding": [
        "My sister's wedding is in three weeks and I still have no suit.",
        "Go to the tailor near the station, he can fit a suit in two weeks.",
        ("What do you think of this one?", "a photo of a navy blue suit on a mannequin", (40, 50, 110)),
        "Navy blue is perfect for a summer wedding.",
    ],
    "painting": [
        "I started a watercolour class on Tuesday evenings.",
        ("My first painting, a sunset over the lake.", "a painting of an orange sunset over a lake", (240, 140, 60)),
        "The colours are beautiful, you are a natural.",
        "The teacher says I should use less water, everything bleeds into everything.",
    ],
    "car_trouble": [
        "The car made a grinding noise every time I braked this morning.",
        "That sounds like the brake pads. Do not drive it on the highway.",
        "The garage can look at it on Monday, I will take the bus until then.",
    ],
    "book_club": [
        "For book club next month we are reading a novel about a lighthouse keeper.",
        "I read it last year, the ending made me cry on the train.",
        "No spoilers! I am only on chapter three.",
        "Fine, but pay attention to the letters in the drawer.",
    ],
    "camping": [
        "We are going camping by the lake the weekend after next.",
        "Do you have a tent for four people? Ours is tiny.",
        ("We bought this one, it even has a porch.", "a photo of a green camping tent next to a lake at dusk", (60, 130, 80)),
        "Perfect, the kids can sleep in the porch part.",
    ],
    "recipe_curry": [
        "Can you send me the recipe for that chickpea curry you made?",
        "Sure: onions, garlic, ginger, two cans of chickpeas, coconut milk and a lot of cumin.",
        "How long does it cook?",
        "Twenty minutes of simmering, then spinach at the very end.",
    ],
    "new_bike": [
        "I finally bought a bike to commute to the office.",
        ("It is a red city bike with a basket.", "a photo of a red city bicycle with a front basket", (210, 40, 40)),
        "Nice, the bike lane along the canal is the fastest way in.",
        "That is the plan, it takes twenty minutes door to door.",
    ],
}

#: Conversations: (tenant, conversation id, speakers, participants visible or None, sessions of topics).
CONVERSATIONS = [
    ("acme", "acme-dm-anna-ben", ("anna", "ben"), True, [["glacier", "laptop"], ["sourdough"], ["marathon"]]),
    ("acme", "acme-dm-anna-chloe", ("chloe", "anna"), True, [["puppy"], ["job_interview", "car_trouble"]]),
    ("acme", "acme-team-platform", ("dev", "ben"), False, [["laptop", "job_interview"], ["moving"]]),
    ("acme", "acme-dm-ben-dev", ("ben", "dev"), True, [["concert"], ["wedding"], ["new_bike"]]),
    ("acme", "acme-dm-chloe-dev", ("dev", "chloe"), True, [["garden", "recipe_curry"], ["painting"]]),
    ("acme", "acme-family-chat", ("erin", "anna"), True, [["camping"], ["book_club", "moving"]]),
    ("acme", "acme-running-club", ("ben", "chloe"), False, [["marathon"], ["new_bike", "car_trouble"]]),
    ("acme", "acme-dm-erin-ben", ("erin", "ben"), True, [["sourdough", "recipe_curry"], ["puppy"]]),
    ("acme", "acme-dm-anna-dev", ("anna", "dev"), True, [["painting"], ["concert", "book_club"]]),
    ("acme", "acme-travel", ("chloe", "erin"), False, [["glacier"], ["camping"], ["wedding"]]),
    ("globex", "globex-dm-fay-gus", ("fay", "gus"), True, [["glacier", "sourdough"], ["moving"]]),
    ("globex", "globex-dm-gus-hana", ("gus", "hana"), True, [["puppy", "garden"], ["job_interview"]]),
    ("globex", "globex-team-ops", ("hana", "ivan"), False, [["laptop"], ["car_trouble", "concert"]]),
    ("globex", "globex-dm-fay-ivan", ("ivan", "fay"), True, [["wedding"], ["new_bike"], ["painting"]]),
    ("globex", "globex-dm-hana-fay", ("fay", "hana"), True, [["camping", "recipe_curry"], ["book_club"]]),
    ("globex", "globex-dm-gus-ivan", ("gus", "ivan"), True, [["marathon"], ["sourdough", "garden"]]),
    ("globex", "globex-book-club", ("hana", "gus"), False, [["book_club"], ["painting", "concert"]]),
    ("globex", "globex-dm-ivan-hana", ("ivan", "hana"), True, [["moving", "laptop"], ["glacier"]]),
    ("globex", "globex-dm-fay-gus-2", ("gus", "fay"), True, [["new_bike"], ["wedding", "puppy"]]),
    ("globex", "globex-garden-club", ("fay", "ivan"), False, [["garden"], ["camping"], ["recipe_curry"]]),
]

#: Example questions the demo answers: (tenant, user, query).
EXAMPLE_QUERIES = [
    ("acme", "anna", "the photo of the blue glacier"),
    ("acme", "chloe", "when did we talk about adopting a beagle puppy?"),
    ("acme", "ben", "who recommended the tailor for the suit?"),
    ("acme", "dev", "chickpea curry recipe"),
    ("globex", "gus", "how long did the sourdough starter take"),
    ("globex", "hana", "what was wrong with the car brakes"),
]
