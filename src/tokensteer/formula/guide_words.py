"""Word lists (written by hand for tokensteer) that strengthen the offline guides beyond the
sentences of ``guide_data.py``: each word is one more labelled example for its class.

Everyday vocabulary of each attribute, not copied from any published lexicon and independent of
the evaluation scorers. Inflections are listed where they are common, since the guides match
whole words.
"""

from __future__ import annotations

POSITIVE = """
good great wonderful lovely beautiful happy happier happiest happily happiness joy joyful joyous glad
delighted delightful pleasant pleased pleasure love loved loves lovely loving enjoy enjoyed enjoys
enjoying enjoyable fun funny cheerful cheer cheers excited exciting excitement thrilled amazing amazed
awesome excellent fantastic fabulous brilliant superb perfect perfectly nice nicely kind kindly kindness
friendly warm warmly welcome welcoming charming sweet gentle calm peaceful relaxed relaxing comfortable
cozy bright sunny fresh best better favorite favourite proud pride grateful thankful thanks thank
appreciate appreciated hope hopeful hopes optimistic inspiring inspired inspiration celebrate celebrated
celebration win won winning success successful succeed succeeded smile smiled smiles smiling laugh
laughed laughing laughter generous helpful support supportive care caring cared safe healthy heal
healed strong courage brave impressive impressed stunning gorgeous elegant graceful glorious splendid
marvelous marvellous terrific incredible remarkable outstanding magnificent beloved blessed blessing
lucky fortunate treasure treasured cherish cherished admire admired adore adored adorable cute
playful lively vibrant fascinating interesting interested engaging rewarding satisfying satisfied
content contented peace harmony friendship friend friends together unforgettable memorable special
gift gifts praise praised recommend recommended easy easily smooth clean tidy neat efficient reliable
trust trusted honest fair true wise clever smart creative talented skilled gifted thoughtful pretty
tasty delicious yummy heavenly dream dreams paradise bliss blissful ecstatic overjoyed jolly merry
festive sunshine hug hugs kiss romantic affection affectionate hooray yay wow glow glowing shine
shining sparkling radiant positive improve improved improvement benefit benefits beneficial useful
worth worthwhile valuable precious fine okay well excellently gladly proudly
"""

NEGATIVE = """
bad worse worst terrible horrible awful dreadful sad sadly sadness unhappy miserable misery gloomy
bleak depressing depressed depression angry anger furious mad annoyed annoying irritated upset hate
hated hates hateful dislike disliked disgusting disgusted gross nasty ugly boring bored dull tedious
tired exhausted sick ill pain painful hurt hurts hurting injured suffer suffered suffering cry cried
crying tears weep grief grieving mourn lonely alone lost lose losing loss fail failed failure fails
broken broke break ruined ruin destroy destroyed disaster disastrous tragic tragedy crisis problem
problems trouble troubled difficult hard harsh cruel mean rude cold hostile violent violence fear
afraid scared frightened terrified terror horror horrifying panic worry worried worries anxious anxiety
stress stressed stressful nervous tense fight fighting war dead death die died dying kill killed
murder crime criminal danger dangerous risk threat threatened attack attacked damage damaged poor
poverty hungry hunger debt fired abandoned rejected reject refused deny denied blame blamed guilt
guilty shame ashamed embarrassed embarrassing regret sorry apology complain complaint complained
disappointed disappointing disappointment frustrated frustrating frustration useless worthless
pointless hopeless helpless desperate despair doom doomed cursed curse evil wicked wrong mistake
mistakes error errors fault faulty bitter sour rotten stale filthy dirty mess messy chaos chaotic
noisy crowded expensive overpriced slow late delayed cancelled canceled unfortunately unfortunate
sorrow heartbreak heartbroken betrayed betrayal lie lied lies liar cheat cheated steal stole stolen
scam fraud jealous envy greedy selfish lazy stupid dumb idiot fool foolish weak negative worse
outrage outraged shocking shocked awful horrid grim dark lonely unbearable ache aching
"""

TOXIC = """
idiot idiots stupid moron morons dumb fool fools loser losers jerk jerks scum trash garbage pig pigs
bastard bastards bitch bitches shit shitty crap crappy damn dammit hell asshole assholes ass fuck
fucking fucked fucker piss pissed screw sucks suck dick dicks prick cunt whore slut retard retarded
freak freaks creep creepy psycho lunatic clown clowns imbecile idiotic brainless pathetic worthless
useless disgusting ugly fat shut hate hated kill die dead ignorant coward cowards liar liars hypocrite
hypocrites parasite rat rats snake vermin filth filthy scumbag dumbass jackass douche douchebag
"""

POLITE = """
please thank thanks thankful kindly respectfully respect respectful polite politely sorry apologise
apologize apologies appreciate appreciated grateful welcome understand understanding agree agreed
discuss discussed suggest suggestion perhaps maybe consider considered help helpful helped listen
listened calm calmly patient patience gentle gently friendly kind considerate thoughtful fair
reasonable sincerely regards dear hello hi colleague colleagues neighbour neighbor friend friends
family kindness care caring support supported forgive forgave peace peaceful together hope honest
"""

# Broader lists, written by category (everyday insults and pejoratives, profanity and its common
# spellings; strong and mild feelings, harm, loss and illness; praise and pleasure), used by the
# guides built with ``word_lists(..., broad=True)``.

TOXIC_MORE = """
imbeciles dimwit dimwits nitwit nitwits halfwit dunce dunces buffoon buffoons oaf oafs twit twits
twat wanker wankers tosser bellend prat git numbskull bonehead boneheads blockhead airhead meathead
knucklehead pinhead dipshit shithead shitheads asshat dickhead dickheads motherfucker motherfuckers
motherfucking fuckers fucks fuckface fuckin fucken effing frigging freaking cocksucker bullshit
horseshit goddamn goddamned bugger arse arsehole bollocks pissing pisses sucker suckers stfu wtf
scumbags lowlife lowlifes degenerate degenerates deadbeat slob slobs pervert perverts weirdo weirdos
sleazebag sleazy skank skanky hag hags bimbo hoe hoes nazi nazis fascist fascists bigot bigots racist
racists sexist sexists misogynist thug thugs crook crooks fraud frauds swindler cheater cheaters
traitor traitors scoundrel villain villains monster monsters savage savages cockroach cockroaches
maggot maggots leech leeches weasel weasels swine moronic imbecilic dimwitted halfwitted clueless
incompetent repulsive revolting vile despicable contemptible loathsome hideous nasty demented
deranged psychotic delusional spineless gutless shameless disgraceful scummy trashy corrupt crooked
bigoted murderer murderers terrorist terrorists killer killers rapist rapists pedophile criminal
criminals thief thieves scammer scammers prostitute hooker pimp junkie druggie drunkard bum bums
hobo peasant peasants redneck rednecks hillbilly wimp wimps wuss sissy pussy crybaby brat brats punk
punks noob noobs dork dorks dweeb butthole stinks stinky smelly fatso lardass fatass ho
"""

NEGATIVE_MORE = """
abysmal appalling atrocious agony agonizing anguish alarming angrily annoyance awkward bankrupt
bankruptcy boredom brutal brutally burden burdened catastrophe catastrophic collapse collapsed
condemn condemned conflict confused confusion corrupt corruption crash crashed criticism criticized
cruelty crushed damaging deadly defeat defeated delay deprived desperately destruction devastated
devastating dire disappoint disgrace disgraceful dismal distress distressed disturbing dread dreaded
drown drowned empty enemy enemies exhausting fatal fearful feared flaw flawed foul fright frightening
fury gloom grieve gruesome harm harmful hatred haunted heartless horrendous horrific humiliated
humiliation hurtful ignored illness injury injuries insult insulted irritating isolated jealousy
lacking lament lethal lousy mourning murdered nightmare nightmares offensive pathetic pity poison
poisoned prison punish punished punishment rage ruthless sadder saddest scary scream screamed
screaming severe shameful shattered sickening sickness sinister slaughter sob sobbing sobbed starving
stuck suicide suspicious threatening tormented torture tortured toxic traumatic trauma unfair
unpleasant victim victims vile weary wept woeful wound wounded wrecked wretched neglected failing
failures disgust miserably tragically upsetting annoy dismay disdain resent resentment scorn whine
whining moan groan hopelessly bitterly decay decayed rot rotting sinking drained meaningless emptiness
regretful remorse ominous sorrows downfall ruins wreck insecure insecurity paranoid cynical resentful
mourned funeral coffin widow orphan homeless famine plague disease cancer infection bleeding bruised
scar scarred unhappily unwell nauseous vomit cough fever freezing gray dreary drab bland
"""

POSITIVE_MORE = """
admirable adventurous affectionately amusing amused applause applauded astonishing attractive
beautifully bless blissfully breathtaking bravely calmly captivating carefree celebrating charm
charmed cheered cheerfully comforting compassion compassionate confident cozily cuddle dazzling
dearest delight delightfully devoted eager effortless elated enchanted enchanting
encouraging energetic enjoyment enthusiastic enthusiasm euphoric exquisite fabulously faithful
fantastically fond fondly fortunately freedom friendlier genius gladness glee gleeful
gracious gratitude greatest handsome harmonious heartwarming heroic hilarious honored honoured
hopefully hospitable humor humour idyllic invigorating jubilant kindest laughs lovelier loveliest
loyal luckily luxurious magical majestic marvel mesmerizing miracle nicest nurturing passionate
pleasantly pleasing plentiful polite prosper prosperous radiance reassuring refreshing rejoice
relief relieved relish romance serene serenity sincere smiley snug soothing spectacular
splendidly stellar sublime successfully sunniest sweetest sweetheart tender
thrilling thriving tranquil triumph triumphant uplifting victorious warmth welcomed
whimsical wonderfully wondrous worthy zest
"""

# Words whose feeling depends on their context (weather, time, effort, prices: "a cold drink", "late
# May", "hard work"): the broad lists leave them out, so a guide is not satisfied by them alone.
MILD = """
late cold dark slow hard break broke lost lose losing loss alone problem problems difficult crowded
noisy expensive delayed cancelled canceled fired risk poor mean weak tired lonely trouble mess messy
dull stale sour bitter harsh crash empty gray freezing bland drab stuck
"""


def words(block: str) -> list[str]:
    """The words of one of the blocks above, in order, without repeats."""
    return list(dict.fromkeys(block.split()))
